"""Live curves against a real visdom server on 127.0.0.1, seen in a real browser, and a clear error
when none answers.

The server is the README's offline one, `python -m utils.visdom_server`: `python -m visdom.server`
downloads the web page's scripts at start and dies without internet.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import visdom
import websocket
from PIL import Image

from tests.conftest import assert_input_error, digits_updates
from utils.errors import InputError
from utils.reporting.visdom_logger import VisdomLogger, server_answers
from utils.reporting.visdom_server import MAX_BODY, USER_STYLE, USER_STYLE_LINK, asset_sources, install_assets

START_TIMEOUT = 60  # seconds; importing tornado and visdom on two busy cores can be slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(folder: Path, *options: str) -> Iterator[int]:
    """`python -m utils.visdom_server` on a free port with options, its environments and log in folder."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "utils.visdom_server",
        "-port",
        str(port),
        "-env_path",
        f"{folder / 'envs'}/",
        "-logging_level",
        "WARNING",
        *options,
    ]
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


@pytest.fixture(scope="module")
def server_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("visdom")


@pytest.fixture(scope="module")
def server(server_folder) -> Iterator[int]:
    """A visdom server with the default options on a free port; yields the port."""
    with running_server(server_folder) as port:
        yield port


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets that listen on port, as the kernel lists them in /proc/net/tcp and
    tcp6 (hexadecimal, each 32-bit word in host byte order)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        rows = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []  # tcp6: without IPv6
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, words))
    return found


def test_the_server_listens_on_the_loopback_address_only(server, server_folder):
    assert listening_addresses(server) == {"127.0.0.1"}
    assert "WARNING" not in (server_folder / "server.log").read_text()


def test_a_wider_address_is_an_explicit_option_with_a_warning(tmp_path):
    with running_server(tmp_path, "--host", "0.0.0.0") as port:
        assert listening_addresses(port) == {"0.0.0.0"}
    log = (tmp_path / "server.log").read_text()
    assert "WARNING: the visdom server listens on 0.0.0.0: anyone who reaches its port" in log


def test_bind_local_with_a_wider_host_is_refused(tmp_path):
    command = [sys.executable, "-m", "utils.visdom_server", "--host", "0.0.0.0", "-bind_local"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "-bind_local contradicts --host 0.0.0.0: drop one of them"


def request_with_body_length(port: int, length: int) -> bytes:
    """The first bytes of the server's answer to a POST announcing a body of length bytes (none sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(f"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        connection.shutdown(socket.SHUT_WR)
        return connection.recv(64)


def test_request_bodies_over_the_cap_are_refused(server):
    assert request_with_body_length(server, MAX_BODY + 1).startswith(b"HTTP/1.1 400")
    assert not request_with_body_length(server, MAX_BODY).startswith(b"HTTP/1.1 400")
    assert server_answers(f"http://127.0.0.1:{server}", timeout=5)


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
    assert traces(found["Training"]) == {
        "loss": ([1, 2, 3], [1, 1 / 2, 1 / 3]),
        "accuracy": ([1, 2, 3], [0.1, 0.2, 0.3]),
    }
    assert traces(found["Recall@1"]) == {"cosine/R@1": ([0], [0.5])}


def test_each_run_draws_its_curves_in_its_own_environment(server, digits_path, experiment, tmp_path):
    updates = [f"visdom_port={server}", "visdom_freq=1", *digits_updates(digits_path)]
    recorded = experiment(f"-F {tmp_path / 'runs'} with epochs=1", *updates)
    assert recorded.code == 0, recorded.err
    unrecorded = experiment("with epochs=1", *updates)
    assert unrecorded.code == 0, unrecorded.err
    folder = next(path for path in tmp_path.iterdir() if path.name.startswith("small_cnn_digits_"))
    envs = [
        (recorded, "metric_learning_runs_1"),  # -F runs: the folder runs/1
        (unrecorded, f"metric_learning_{tmp_path.name}_{folder.name}"),  # output_dir=tmp_path
    ]
    for outcome, env in envs:
        found = windows(server, env)
        assert set(found) == {"Training", "Recall@1"}
        training = traces(found["Training"])
        assert set(training) == {"loss", "cross_entropy", "accuracy"}
        # 50 training images in batches of 16: 3 iterations, a point after each at epoch + i / 3; only this run's.
        assert training["loss"][0] == pytest.approx([1 / 3, 2 / 3, 1])
        recall = traces(found["Recall@1"])
        assert set(recall) == {"l2/R@1", "cosine/R@1"}
        assert recall["cosine/R@1"][0] == [0, 1]
        assert outcome.run.result in recall["cosine/R@1"][1]
    assert windows(server, "main") == {}  # the environment every run shared before


def test_install_assets_fills_the_static_folder(tmp_path):
    extras = "".join(
        f'<script src={{{{ static_url("{script}") }}}}></script>\n'
        for script in ("js/mathjax/2.7.5/MathJax.js", "js/d3.v3.min.js", "js/saveSvgAsPng.js")
    )
    page = f'<link href={USER_STYLE}>\n{extras}<script src={{{{ static_url("js/main.js") }}}}></script>\n'
    (tmp_path / "index.html").write_text(page)
    install_assets(tmp_path)
    for relative, source in asset_sources().items():
        assert (tmp_path / relative).read_bytes() == source.read_bytes()
    assert {"js/plotly-plotly.min.js", "js/react-react.min.js", "css/bootstrap.min.css"} <= set(asset_sources())
    mended = f'<link href={USER_STYLE_LINK}>\n<script src={{{{ static_url("js/main.js") }}}}></script>\n'
    assert (tmp_path / "index.html").read_text() == mended
    install_assets(tmp_path)  # again, as every start does
    assert (tmp_path / "index.html").read_text() == mended


def test_unwritable_static_folder_is_a_clear_error(tmp_path):
    (tmp_path / "static").write_text("a file where the folder should be")
    with pytest.raises(InputError, match=f"cannot install visdom's web page scripts into {tmp_path / 'static'}"):
        install_assets(tmp_path / "static")


def test_no_server_is_a_clear_error(capsys):
    port = free_port()
    with pytest.raises(InputError, match=f"no visdom server answers at http://127.0.0.1:{port}"):
        VisdomLogger(port)
    assert capsys.readouterr() == ("", "")  # visdom's client printed nothing: it was never started


def test_experiment_without_server(digits_path, experiment):
    port = free_port()
    outcome = experiment(f"with epochs=1 visdom_port={port}", *digits_updates(digits_path))
    assert_input_error(
        outcome,
        "no visdom server answers",
        # The offline server, started as running_server starts it (`python -m visdom.server` fails offline).
        f"start one with `python -m utils.visdom_server -port {port}` (offline)",
        "leave visdom_port unset",
    )


PLOTLY_BLUE = np.array([31, 119, 180])  # plotly's first trace colour, #1f77b4


def chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's `chromium` package)")
    return browser


def screenshot(url: str, path: Path) -> np.ndarray:
    """The page at url as headless Chromium draws it, once its scripts have run, as RGB pixels."""
    browser = chromium()
    # A profile of its own: a shared one would clash with other browsers; --no-sandbox: CI runs as root.
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={path.parent / 'profile'}",
            "--window-size=1000,700",
            "--virtual-time-budget=5000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def trace_pixels(pixels: np.ndarray) -> int:
    return int((np.abs(pixels - PLOTLY_BLUE).sum(axis=-1) < 40).sum())


def test_browser_shows_the_logged_curve(server, tmp_path):
    # One point makes the environment and its window (a page for an unknown one shows another
    # environment) but draws no line: only the legend's short sample, about 50 pixels.
    plot = VisdomLogger(server, env="test_browser")
    plot("loss", "Training", 1, 1.0)
    url = f"http://127.0.0.1:{server}/env/test_browser"
    before = trace_pixels(screenshot(url, tmp_path / "before.png"))
    assert before < 100
    for x in range(2, 11):
        plot("loss", "Training", x, 1 / x)
    assert trace_pixels(screenshot(url, tmp_path / "after.png")) > before + 200


@contextmanager
def devtools(profile: Path) -> Iterator[websocket.WebSocket]:
    """A blank page of headless Chromium, driven through the DevTools protocol (the connection to its page)."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    # Port 0: Chromium picks a free port and writes it in the profile's DevToolsActivePort.
    browser = subprocess.Popen([*command, "--remote-debugging-port=0", "about:blank"], stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not (port_file.exists() and "\n" in port_file.read_text()):
            assert browser.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
        page = next(target for target in targets if target["type"] == "page")
        connection = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        try:
            yield connection
        finally:
            connection.close()
    finally:
        browser.terminate()
        browser.wait(timeout=30)


def page_problem(event: str, details: dict) -> str | None:
    """What a DevTools event says went wrong on the page: a failed request (a status >= 400, or none), a console
    error or an uncaught exception; None for any other event."""
    if event == "Network.responseReceived" and details["response"]["status"] >= 400:
        return f"{details['response']['status']} {details['response']['url']}"
    if event == "Network.loadingFailed":
        return f"request failed: {details['errorText']}"
    if event == "Runtime.exceptionThrown":
        return f"uncaught: {details['exceptionDetails']}"
    if event == "Runtime.consoleAPICalled" and details["type"] in ("error", "assert"):
        return f"console.{details['type']}: {details['args']}"
    if event == "Log.entryAdded" and details["entry"]["level"] == "error":
        return f"log: {details['entry']['text']}"
    return None


def load_page(url: str, profile: Path, plots: int, settle: float = 2.0) -> list[str]:
    """Open url in headless Chromium and wait until it has drawn plots plotly plots, and settle seconds more: every
    problem of the page until then (page_problem)."""
    problems, count = [], "document.querySelectorAll('.js-plotly-plot').length"
    with devtools(profile) as page:
        for number, method in enumerate(("Runtime.enable", "Log.enable", "Network.enable"), 1):
            page.send(json.dumps({"id": number, "method": method}))
        page.send(json.dumps({"id": 10, "method": "Page.navigate", "params": {"url": url}}))
        page.settimeout(0.5)
        drawn, deadline, asked = None, time.monotonic() + START_TIMEOUT, 0.0
        while drawn is None or time.monotonic() < drawn + settle:
            assert time.monotonic() < deadline, f"{url} drew no {plots} plots in {START_TIMEOUT} s: {problems}"
            if drawn is None and time.monotonic() > asked + 0.5:  # the answer comes back among the events
                asked = time.monotonic()
                page.send(json.dumps({"id": 11, "method": "Runtime.evaluate", "params": {"expression": count}}))
            try:
                message = json.loads(page.recv())
            except websocket.WebSocketTimeoutException:
                continue
            answer = message.get("result", {}).get("result", {}) if message.get("id") == 11 else {}
            if drawn is None and answer.get("value") == plots:
                drawn = time.monotonic()
            problem = page_problem(message.get("method", ""), message.get("params", {}))
            if problem is not None:
                problems.append(problem)
    return problems


def test_the_page_loads_every_file_it_asks_for_without_a_console_error(server, server_folder, tmp_path):
    plot = VisdomLogger(server, env="test_page")
    for x in range(1, 4):
        plot("loss", "Training", x, 1 / x)
    log = server_folder / "server.log"
    log_before = log.stat().st_size
    # Once the page's scripts have drawn the window's plot, and a moment more.
    assert load_page(f"http://127.0.0.1:{server}/env/test_page", tmp_path / "profile", plots=1) == []
    with open(log, "rb") as lines:
        lines.seek(log_before)
        assert b" 404 " not in lines.read()  # tornado logs each request it answers 404 at WARNING
