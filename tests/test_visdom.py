"""Live curves against a real visdom server on 127.0.0.1, and a clear error when none answers.

`python -m visdom.server` first downloads the web page's scripts and dies offline; the server's
own entry point, run_server.main, serves without them, which is all the plotting API needs.
"""

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import visdom

from tests.conftest import assert_input_error, digits_updates
from utils.errors import InputError
from utils.visdom_logger import VisdomLogger, server_answers

START_TIMEOUT = 60  # seconds; importing tornado and visdom on two busy cores can be slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[int]:
    """A visdom server on a free local port, its environments in a temporary folder; yields the port."""
    folder = tmp_path_factory.mktemp("visdom")
    port = free_port()
    command = [sys.executable, "-c", "from visdom.server.run_server import main; main()", "-port", str(port),
               "-bind_local", "-env_path", f"{folder / 'envs'}/", "-logging_level", "WARNING"]
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server_answers(f"http://127.0.0.1:{port}", timeout=1):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the visdom server did not start:\n{(folder / 'server.log').read_text()}")
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def windows(port: int, env: str) -> dict[str, dict]:
    """The server's windows of env by title, read back through visdom's client."""
    client = visdom.Visdom(port=port, env=env, use_incoming_socket=False, raise_exceptions=True)
    return {window["title"]: window for window in json.loads(client.get_window_data(env=env)).values()}


def traces(window: dict) -> dict[str, tuple[list[float], list[float]]]:
    return {trace["name"]: (trace["x"], trace["y"]) for trace in window["content"]["data"]}


def test_logger_appends_to_named_curves(server):
    plot = VisdomLogger(server, env="test_logger")
    for x in (1, 2, 3):
        plot("loss", "Training", x, 1 / x)
        plot("accuracy", "Training", x, x / 10)  # a second curve in the same window
    plot("cosine/R@1", "Recall@1", 0, 0.5)
    found = windows(server, "test_logger")
    assert set(found) == {"Training", "Recall@1"}
    assert traces(found["Training"]) == {"loss": ([1, 2, 3], [1, 1 / 2, 1 / 3]),
                                         "accuracy": ([1, 2, 3], [0.1, 0.2, 0.3])}
    assert traces(found["Recall@1"]) == {"cosine/R@1": ([0], [0.5])}


def test_experiment_draws_training_and_recall_curves(server, digits_path, experiment):
    outcome = experiment(f"with epochs=1 visdom_port={server} visdom_freq=1", *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    found = windows(server, "main")
    assert set(found) == {"Training", "Recall@1"}
    training = traces(found["Training"])
    assert set(training) == {"loss", "cross_entropy", "accuracy"}
    # 50 training images in batches of 16: 3 iterations, a point after each at epoch + i / 3.
    assert training["loss"][0] == pytest.approx([1 / 3, 2 / 3, 1])
    recall = traces(found["Recall@1"])
    assert set(recall) == {"l2/R@1", "cosine/R@1"}
    assert recall["cosine/R@1"][0] == [0, 1]
    assert outcome.run.result in recall["cosine/R@1"][1]


def test_no_server_is_a_clear_error(capsys):
    port = free_port()
    with pytest.raises(InputError, match=f"no visdom server answers at http://127.0.0.1:{port}"):
        VisdomLogger(port)
    assert capsys.readouterr() == ("", "")  # visdom's client printed nothing: it was never started


def test_experiment_without_server(digits_path, experiment):
    outcome = experiment(f"with epochs=1 visdom_port={free_port()}", *digits_updates(digits_path))
    assert_input_error(outcome, "no visdom server answers", "python -m visdom.server", "leave visdom_port unset")

