"""The layering rules of the source tree, checked on its import statements, and docs derived from registries."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from models.backbones import BACKBONES, registry_table
from models.ingredient import model_ingredient

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = ("experiment", "autoencoder_experiment", "prepare_data")
# folder -> modules its files must not import (a module or any of its submodules), at the top or inside a function.
# A file obeys the rules of every folder above it.
FORBIDDEN = {
    "models": ("losses", "utils.data", "utils.evaluation", "utils.engine"),
    "losses": ("utils.engine",),
    "utils": EXPERIMENTS,
    "utils/data": ("utils.evaluation",),
    "utils/engine": ("utils.reporting", "visdom", "matplotlib", "sacred"),
}
LIBRARY = ("models", "losses", "utils")  # every file of these obeys the rules; the experiments and tests are the edge
EDGE = {*EXPERIMENTS, "tests", "benchmarks", "data", "docs"}
LIBRARY_FILES = sorted(path.relative_to(REPO) for package in LIBRARY for path in (REPO / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def forbidden_for(path: Path) -> tuple[str, ...]:
    return tuple(bad for folder, rules in FORBIDDEN.items() if path.is_relative_to(folder) for bad in rules)


@pytest.mark.parametrize(
    "path",
    LIBRARY_FILES,
    ids=str,
)
def test_library_imports_respect_the_layers(path: Path) -> None:
    violations = [
        f"{path} imports {module}"
        for module in sorted(imported_modules(REPO / path))
        if any(module == bad or module.startswith(bad + ".") for bad in forbidden_for(path))
    ]
    assert not violations


def test_every_python_file_is_library_or_edge() -> None:
    """A new top-level package would escape the layering rules: it must be added to LIBRARY or EDGE."""
    tops = {path.relative_to(REPO).parts[0].removesuffix(".py") for path in REPO.glob("*") if path.suffix == ".py"}
    tops |= {path.name for path in REPO.iterdir() if path.is_dir() and any(path.rglob("*.py"))}
    assert tops - {".venv", *LIBRARY, *EDGE} == set()


def test_the_engine_loads_no_plotting_visdom_or_experiment() -> None:
    """The oracle beside the import statements: what importing the engine really loads, in a fresh process."""
    code = (
        "import sys, utils.engine.driver, utils.engine.checkpoint, utils.engine.config; "
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'matplotlib', 'visdom', *sys.argv[1:]}) "
        "+ sorted(name for name in sys.modules if name.startswith('utils.reporting')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *EXPERIMENTS], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import losses.metrix\nfrom utils.data.ingredient import x\nfrom . import y\n")
    assert imported_modules(source) == {"losses.metrix", "utils.data.ingredient"}


def test_named_configs_and_docs_table_come_from_the_backbone_registry() -> None:
    named = {name.removeprefix("model.") for name, _ in model_ingredient.gather_named_configs()}
    assert set(BACKBONES) <= named
    assert registry_table() in (REPO / "docs" / "models.md").read_text()


def test_utils_keeps_its_modules_in_wings() -> None:
    # Shared helpers and the two `python -m utils.*` entry points only; everything else lives in a wing.
    loose = sorted(path.name for path in (REPO / "utils").glob("*.py") if path.name != "__init__.py")
    assert len(loose) <= 6, loose
