"""The layering rules of the source tree, checked on its import statements, and docs derived from registries."""

import ast
from pathlib import Path

import pytest

from models.backbones import BACKBONES, registry_table
from models.ingredient import model_ingredient

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = ("experiment", "autoencoder_experiment", "prepare_data")
# package -> modules it must not import (a module or any of its submodules)
FORBIDDEN = {
    "models": ("losses", "utils.data", "utils.evaluation", *EXPERIMENTS),
    "losses": EXPERIMENTS,
    "utils/data": ("utils.evaluation", *EXPERIMENTS),
}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("package", FORBIDDEN)
def test_package_imports_respect_the_layers(package: str) -> None:
    violations = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sorted((REPO / package).rglob("*.py"))
        for module in imported_modules(path)
        if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[package])
    ]
    assert not violations


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import losses.metrix\nfrom utils.data.ingredient import x\nfrom . import y\n")
    assert imported_modules(source) == {"losses.metrix", "utils.data.ingredient"}


def test_named_configs_and_readme_come_from_the_backbone_registry() -> None:
    named = {name.removeprefix("model.") for name, _ in model_ingredient.gather_named_configs()}
    assert set(BACKBONES) <= named
    assert registry_table() in (REPO / "README.md").read_text()
