"""docs/configuration.md is generated from `Settings`: stale, it fails here (`make docs`
rewrites it), and every setting says what it is."""

from __future__ import annotations

from tokentill.settings import Settings
from tokentill.settings_doc import PAGE, _comments, render


def test_the_configuration_page_is_generated_from_the_settings() -> None:
    assert PAGE.read_text("utf-8") == render(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_is_described() -> None:
    described = _comments()
    assert [name for name in Settings.model_fields if not described.get(name)] == []
    for name in Settings.model_fields:
        assert f"`TOKENTILL_{name.upper()}`" in render()
