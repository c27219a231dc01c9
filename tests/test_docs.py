"""The README is a short user's guide whose links resolve; derived tables in the docs are their registries' text;
nothing in the documentation points outside the repository."""

import re
from pathlib import Path

import pytest

from utils.data.specs import markdown_table, mirrors_table

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# CI and the tests' instructions rely on these two lines, word for word.
INSTALL_AND_RUN = (
    "python3.11 -m venv .venv && PIP_CONSTRAINT=build-constraints.txt .venv/bin/pip install -r requirements.txt "
    "&& .venv/bin/python experiment.py"
)
INSTALL_AND_TEST = (
    "python3.11 -m venv .venv && PIP_CONSTRAINT=build-constraints.txt .venv/bin/pip install -r requirements-dev.txt "
    "&& .venv/bin/python -m pytest"
)


def test_the_readme_is_a_short_guide_with_the_install_lines() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    lines = {line.strip() for line in readme.splitlines()}
    assert INSTALL_AND_RUN in lines and INSTALL_AND_TEST in lines
    assert INSTALL_AND_TEST in (REPO / ".ci" / "run").read_text()


def test_the_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", (REPO / "README.md").read_text())
    local = [link for link in links if not link.startswith("http")]
    assert local and [link for link in local if not (REPO / link).exists()] == []


def test_the_data_tables_are_the_specifications() -> None:
    assert markdown_table() in (REPO / "docs" / "data.md").read_text()
    assert mirrors_table() in (REPO / "data" / "README.md").read_text()


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_nothing_points_outside_the_repository(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"DESIGN\.md|\.\./shared|the seeds", text)
