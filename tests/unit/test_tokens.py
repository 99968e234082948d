"""Which tokens an admin may manage: never one that reaches beyond its own namespaces."""

from __future__ import annotations

from controller.tokens import covers


def test_an_admin_of_every_namespace_manages_every_token() -> None:
    assert covers(["*"], ["*"]) and covers(["*"], ["a", "b"])


def test_an_admin_of_some_namespaces_manages_only_tokens_within_them() -> None:
    assert covers(["a", "b"], ["a"]) and covers(["a", "b"], ["b", "a"])
    assert not covers(["a"], ["a", "b"])
    assert not covers(["a"], ["*"])  # '*' is every namespace, not a name
    assert not covers(["a"], ["b"])
