"""A -F folder that is a file or cannot be written stops the run with one line, before it starts."""

import os
from pathlib import Path

import pytest

from tests.conftest import assert_input_error, digits_updates
from utils.errors import InputError
from utils.reporting.sacred_run import check_run_folder


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: read-only permissions, or for root (whom they do not stop) a
    folder on sysfs, which refuses new folders."""
    if os.geteuid() == 0:
        return Path("/sys/dml-run-folder")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "runs"


def test_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(InputError, match=f"^-F {tmp_path / 'notes.txt'} is a file, not a folder"):
        check_run_folder({"--file_storage": str(tmp_path / "notes.txt")})


def test_a_folder_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(InputError, match=f"^-F {tmp_path / 'notes.txt' / 'runs'} cannot be written .*you can write"):
        check_run_folder({"--file_storage": str(tmp_path / "notes.txt" / "runs")})


def test_an_unwritable_folder_is_refused(tmp_path):
    folder = unwritable_folder(tmp_path)
    with pytest.raises(InputError, match=f"^-F {folder} cannot be written"):
        check_run_folder({"--file_storage": str(folder)})


def test_a_new_folder_is_made_and_no_option_is_no_check(tmp_path):
    check_run_folder({"--file_storage": str(tmp_path / "a" / "b")})
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    check_run_folder({"--file_storage": None})


@pytest.mark.parametrize("script", ["experiment", "autoencoder_experiment"])
@pytest.mark.parametrize("target", ["file", "unwritable"])
def test_the_experiments_check_the_run_folder_first(script, target, digits_path, request, tmp_path):
    run = request.getfixturevalue(script)
    if target == "file":
        folder = tmp_path / "notes.txt"
        folder.write_text("not a folder")
        expected = f"-F {folder} is a file, not a folder"
    else:
        folder = unwritable_folder(tmp_path)
        expected = f"-F {folder} cannot be written"
    assert_input_error(run(f"-F {folder} with epochs=1", *digits_updates(digits_path)), expected)
