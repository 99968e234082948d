"""``dagsmith surgery --param``: text as written, JSON after ``:=``, clean errors otherwise."""

from __future__ import annotations

import pytest
import typer

from dagsmith.cli.surgery_cmds import _params


def test_text_stays_text_and_json_is_typed() -> None:
    got = _params(
        ["text={{ tasks.greet.output.text }}", "note=note: fix", "open=[unclosed", "n:=3", "on:=true", "xs:=[1, 2]"],
        None,
    )
    assert got == {
        "text": "{{ tasks.greet.output.text }}",
        "note": "note: fix",
        "open": "[unclosed",
        "n": 3,
        "on": True,
        "xs": [1, 2],
    }
    assert _params(["empty="], '{"a": 1}') == {"a": 1, "empty": ""}
    assert _params([], None) is None


@pytest.mark.parametrize("pair", ["novalue", "=x", "bad:=[unclosed", ":=1"])
def test_malformed_pairs_exit_2(pair: str) -> None:
    with pytest.raises(typer.Exit) as raised:
        _params([pair], None)
    assert raised.value.exit_code == 2
