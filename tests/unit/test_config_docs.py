"""docs/config.md is generated from the `xkd:` schema (`python -m scripts.config_docs`) and must match it;
docs/layout.md must name every module of the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.config_docs import PAGE, SECTIONS, render

PACKAGE = Path(__file__).resolve().parents[2] / "axolotl_xkd"


def test_committed_config_page_is_current():
    assert PAGE.read_text() == render(), "docs/config.md is stale: run `python -m scripts.config_docs`"


@pytest.mark.parametrize("schema", [schema for _, _, schema, _ in SECTIONS], ids=lambda s: s.__name__)
def test_every_key_has_a_description_and_an_example(schema):
    page = render()
    for name, field in schema.model_fields.items():
        assert field.description, f"{schema.__name__}.{name} has no Field(description=...) in axolotl_xkd/args.py"
        assert f"`{name}: " in page, f"docs/config.md shows no example for {schema.__name__}.{name}"


def test_layout_page_names_every_module():
    layout = (PAGE.parent / "layout.md").read_text()
    modules = {p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(str(m) for m in modules if f"`{m.name}`" not in layout)
    packages = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    missing += [f"{p}/" for p in packages if f"`{p}/`" not in layout]
    assert not missing, f"docs/layout.md does not name: {missing}"


def test_readme_stays_short():
    """The README keeps what it is, the two commands, the config snippet, the outputs and links; the rest lives in
    docs/, so it stays under 8,000 characters."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert len(readme) <= 8000, len(readme)
