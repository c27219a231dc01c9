"""utils.data.native: C kernels built once per machine into a private cache, loaded only when the file is the one
built there, and the fallback, with one warning, where none can be built or the cached file fails its check."""

import os
import stat
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.data import jpeg_box, native
from utils.data.device_augment import load_pixels

ANSWER = "int answer(void) { return ANSWER; }\n"


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cache folder of the test's own, and no library loaded before the test or kept after it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.load.cache_clear()
    jpeg_box.kernel.cache_clear()
    yield
    native.load.cache_clear()
    jpeg_box.kernel.cache_clear()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "answer.c"
    path.write_text(ANSWER)
    return path


def loaded_with_warnings(source: Path, **macros: str) -> tuple[object, list[str]]:
    """native.load's result and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library = native.load(source, **macros)
    return library, [str(warning.message) for warning in caught]


def test_a_kernel_is_built_once_into_a_private_folder_and_then_loaded_from_it(source: Path, tmp_path: Path) -> None:
    library = native.load(source, ANSWER="42")
    if library is None:
        pytest.skip("no C compiler here")
    assert library.answer() == 42
    folder = tmp_path / "cache" / "metric-learning" / "kernels"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    built = list(folder.glob("answer-*.so"))
    assert len(built) == 1 and native.record_path(built[0]).exists()
    modified = built[0].stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load(source, ANSWER="42").answer() == 42
    assert built[0].stat().st_mtime_ns == modified
    # Other macros are another library.
    assert native.load(source, ANSWER="7").answer() == 7
    assert len(list(folder.glob("answer-*.so"))) == 2


def test_without_a_compiler_the_caller_is_told_once(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    library, messages = loaded_with_warnings(source, ANSWER="1")
    assert library is None
    assert messages == [
        "no C compiler ('no-such-compiler'); install gcc or set CC: answer.c is not used, and the slower code it "
        "replaces runs instead"
    ]


def test_a_source_that_does_not_compile_gives_the_compilers_first_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return undeclared_name; }\n")
    with pytest.warns(UserWarning, match="could not build broken.c .*undeclared_name"):
        assert native.load(broken) is None
    assert not list((tmp_path / "cache" / "metric-learning" / "kernels").glob("broken-*"))


def test_a_cache_that_cannot_be_written_is_named(source: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match=r"kernel cache .*file/metric-learning/kernels cannot be made.*XDG_CACHE_HOME"):
        assert native.load(source, ANSWER="1") is None


def test_a_cache_others_can_write_is_refused(source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "metric-learning" / "kernels"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    library, messages = loaded_with_warnings(source, ANSWER="1")
    assert library is None and len(messages) == 1
    assert "can be written by other users; run chmod 700" in messages[0]
    assert not list(folder.glob("answer-*"))


@pytest.mark.skipif(os.getuid() != 0, reason="giving the folder to another user needs root")
def test_a_cache_of_another_user_is_refused(source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "metric-learning" / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    os.chown(folder, 65534, 65534)
    library, messages = loaded_with_warnings(source, ANSWER="1")
    assert library is None and len(messages) == 1 and "belongs to another user" in messages[0]


def test_a_planted_library_is_not_loaded(source: Path, tmp_path: Path) -> None:
    """A real library under the expected name, whose constructor would leave a marker: never run."""
    marker = tmp_path / "planted-code-ran"
    planted = tmp_path / "planted.c"
    planted.write_text(
        '#include <stdio.h>\n__attribute__((constructor)) static void run(void) { fclose(fopen("'
        + str(marker)
        + '", "w")); }\nint answer(void) { return 666; }\n'
    )
    expected = native.library_path(source, ANSWER="1")
    expected.parent.mkdir(parents=True, mode=0o700)
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(expected), str(planted)], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no C compiler here")
    library, messages = loaded_with_warnings(source, ANSWER="1")
    assert library is None and not marker.exists()
    assert len(messages) == 1 and "cannot be checked" in messages[0] and f"remove {expected}" in messages[0]


DAMAGES = {
    "truncated": lambda path: os.truncate(path, path.stat().st_size // 2),
    "garbage": lambda path: path.write_bytes(b"\x7fELF" + b"garbage" * 1000),
    "empty": lambda path: path.write_bytes(b""),
    "folder": lambda path: (path.unlink(), path.mkdir()),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cached_library_gives_one_warning_and_the_work_completes(tmp_path: Path, damage: str) -> None:
    """The box decoder's library damaged in the cache: JPEGs are then decoded whole, with the same pixels."""
    try:
        library = native.verified_build(jpeg_box.SOURCE, ("jpeg",), {})  # built, not loaded
    except native.Refused:
        pytest.skip("jpeg_box.c cannot be built here (no compiler or no libjpeg headers)")
    DAMAGES[damage](library)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels = [load_pixels(tmp_path / "x.jpg") for _ in range(3)]
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and f"remove {library} to build it again" in messages[0], messages
    for decoded in pixels:
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), np.array(Image.open(tmp_path / "x.jpg")))
