"""Regenerate the settings table in README.md from dagsmith.settings (python -m scripts.readme_settings)."""

from pathlib import Path

from dagsmith.settings import settings_table

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
readme.write_text(text[: text.index(START) + len(START)] + "\n" + settings_table() + "\n" + text[text.index(END) :])
