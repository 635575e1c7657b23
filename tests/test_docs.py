"""The documentation cannot drift: docs/configuration.md is generated from qpruner/config.py (python -m
qpruner.config_docs --write) and must equal what the code generates, and every relative link in README.md and
docs/ points at a file that exists and, with #anchor, at a heading in it."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from qpruner import config as config_module
from qpruner.config_docs import DOC_PATH, SUPPLEMENT, generate, main


def _field_paths(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls, vars(config_module))
    paths = set()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            paths |= _field_paths(hints[f.name], f"{path}.")
        else:
            paths.add(path)
    return paths


def test_committed_configuration_reference_is_the_generated_one():
    assert DOC_PATH.read_text() == generate(), "docs/configuration.md is stale: run `python -m qpruner.config_docs --write`"


def test_every_config_key_has_a_row_with_its_default_and_a_meaning():
    text = generate()
    paths = _field_paths(config_module.Config)
    for path in paths:
        section, key = path.rsplit(".", 1)
        block = text.split(f"## `{section}`\n", 1)[1].split("\n## ", 1)[0]
        row = next(line for line in block.splitlines() if line.startswith(f"| `{key}` |"))
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[2].startswith("`"), f"{path}: no default in {row!r}"
        assert cells[3], f"{path} has no meaning: comment the field in qpruner/config.py or add it to SUPPLEMENT"
    assert "ratio` | number | `0.2` |" in text and '"taylor" \\| "random"' in text


def test_supplement_names_only_real_fields():
    assert set(SUPPLEMENT) <= _field_paths(config_module.Config)


def test_check_flag_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr("qpruner.config_docs.DOC_PATH", stale)
    assert main(["--check"]) == 1 and "--write" in capsys.readouterr().err
    assert main(["--write"]) == 0 and main(["--check"]) == 0 and stale.read_text() == generate()


REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text().splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link {target!r} points at a missing file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link {target!r}: no heading #{anchor} in {dest.name}"
