"""Which tokens an admin may manage (never one that reaches beyond its own namespaces), and which
names a token may have."""

from __future__ import annotations

import uuid

import pytest

from controller.tokens import covers


def test_an_admin_of_every_namespace_manages_every_token() -> None:
    assert covers(["*"], ["*"]) and covers(["*"], ["a", "b"])


def test_an_admin_of_some_namespaces_manages_only_tokens_within_them() -> None:
    assert covers(["a", "b"], ["a"]) and covers(["a", "b"], ["b", "a"])
    assert not covers(["a"], ["a", "b"])
    assert not covers(["a"], ["*"])  # '*' is every namespace, not a name
    assert not covers(["a"], ["b"])


@pytest.mark.parametrize(
    ("name", "says"),
    [("admin", "the bootstrap token's name"), ("Admin", "the bootstrap token's name"), (str(uuid.uuid4()), "UUID")],
)
def test_token_names_that_would_be_mistaken_for_another_are_refused(name: str, says: str) -> None:
    from pydantic import ValidationError

    from api.routes.tokens import TokenRequest

    with pytest.raises(ValidationError, match=says):
        TokenRequest(name=name, scopes=["read"], namespaces=["*"])
    assert TokenRequest(name="ci-bot", scopes=["read"], namespaces=["*"]).name == "ci-bot"
