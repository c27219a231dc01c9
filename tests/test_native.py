"""utils.native: C kernels built once per machine into the cache, and the fallback where none can be built."""

import threading
from pathlib import Path

import pytest
import torch

import models.mixing
from utils import native

KERNEL = Path(models.mixing.__file__).with_name("grid_max.c")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cache folder of the test's own, and no library loaded before the test or kept after it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def test_a_kernel_is_built_once_and_then_loaded_from_the_cache(tmp_path: Path) -> None:
    library = native.load(KERNEL, REAL="float")
    if library is None:
        pytest.skip("no C compiler here")
    built = list((tmp_path / "cache" / "metric-learning").glob("grid_max-*.so"))
    assert len(built) == 1
    modified = built[0].stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load(KERNEL, REAL="float") is not None
    assert built[0].stat().st_mtime_ns == modified
    # Other macros are another library.
    assert native.load(KERNEL, REAL="double") is not None
    assert len(list((tmp_path / "cache" / "metric-learning").glob("grid_max-*.so"))) == 2


def test_without_a_compiler_the_torch_code_runs_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    message = "no C compiler .'no-such-compiler'.: grid_max.c is not built, and the slower code it replaces runs"
    with pytest.warns(UserWarning, match=message):
        assert models.mixing.grid_max_kernel(torch.zeros(1)) is None
    maps = torch.randn(4, 3, 2, 2)
    pairs = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 2, 3, 0, 2, 3])
    pooled = models.mixing.mixed_pool(maps, *pairs, torch.tensor(0.25), "max")
    mixed = 0.25 * maps[pairs[0]] + 0.75 * maps[pairs[1]]
    torch.testing.assert_close(pooled, mixed.amax(dim=(2, 3)))


def test_a_source_that_does_not_compile_gives_the_compilers_first_error(tmp_path: Path) -> None:
    if native.load(KERNEL, REAL="float") is None:
        pytest.skip("no C compiler here")
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return undeclared_name; }\n")
    with pytest.warns(UserWarning, match="could not build broken.c .*undeclared_name"):
        assert native.load(broken) is None
    assert not list((tmp_path / "cache" / "metric-learning").glob("broken-*"))


@pytest.mark.parametrize("count", [0, 1, 2, 7, 100])
def test_in_parallel_covers_every_row_once(count: int) -> None:
    calls, lock = [], threading.Lock()

    def record(part: int, begin: int, end: int) -> None:
        with lock:
            calls.append((part, begin, end))

    native.in_parallel(record, count)
    calls.sort()
    assert [part for part, _, _ in calls] == list(range(len(calls)))
    assert [row for _, begin, end in calls for row in range(begin, end)] == list(range(count))


def test_an_error_in_a_thread_reaches_the_caller() -> None:
    def fail(part: int, begin: int, end: int) -> None:
        raise RuntimeError(f"part {part} failed")

    with pytest.raises(RuntimeError, match="failed"):
        native.in_parallel(fail, 4)


def test_a_cache_that_cannot_be_written_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if native.load(KERNEL, REAL="float") is None:
        pytest.skip("no C compiler here")
    native.load.cache_clear()
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match=r"could not build grid_max.c .*file/metric-learning.*XDG_CACHE_HOME"):
        assert native.load(KERNEL, REAL="float") is None
