"""The README's settings table is generated from the settings class; keep it that way."""

from pathlib import Path

from dagsmith.settings import settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_is_current() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == settings_table().strip(), "run: python -m scripts.readme_settings"
