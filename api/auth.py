"""Who is calling: Bearer tokens, scopes (read < write < admin) and namespaces.

A token bound to namespaces sees nothing else: another namespace's workflow is a 404, exactly
like one that does not exist, so a token cannot even learn which ids exist elsewhere.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import AppState, state
from api.errors import APIError
from controller import tokens

bearer = HTTPBearer(auto_error=False, description="An API token: `dagsmith tokens create`, or DAGSMITH_ADMIN_TOKEN.")


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    namespaces: tuple[str, ...]  # ("*",) for every namespace

    @property
    def namespace_filter(self) -> list[str] | None:
        """None when the principal sees every namespace, else the list it may see."""
        return None if "*" in self.namespaces else list(self.namespaces)

    def may_use(self, namespace: str) -> bool:
        return "*" in self.namespaces or namespace in self.namespaces

    @property
    def actor(self) -> str:
        return f"user:{self.name}"


ANONYMOUS = Principal("anonymous", frozenset(tokens.SCOPES), ("*",))


async def authenticate(app: AppState, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    if not app.settings.auth:
        return ANONYMOUS
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise APIError(401, "unauthorized", "an API token is required (Authorization: Bearer <token>)")
    token = credentials.credentials
    admin = app.settings.admin_token
    if admin is not None and hmac.compare_digest(token.encode(), admin.get_secret_value().encode()):
        return Principal("admin", frozenset(tokens.SCOPES), ("*",))
    async with app.db.begin() as conn:
        record = await tokens.lookup(conn, token)
    if record is None:
        raise APIError(401, "unauthorized", "the API token is unknown, revoked or expired")
    return Principal(record.name, frozenset(tokens.expand_scopes(record.scopes)), tuple(record.namespaces))


def require(scope: str, *, every_namespace: bool = False) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller's token has ``scope`` (and, for what is installation-wide rather
    than per namespace, covers every namespace)."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        principal = await authenticate(state(request), credentials)
        if scope not in principal.scopes:
            raise APIError(403, "forbidden", f"this token lacks the {scope!r} scope")
        if every_namespace and principal.namespace_filter is not None:
            raise APIError(
                403, "forbidden", "this applies to every namespace: it needs a token for all of them (namespaces ['*'])"
            )
        return principal

    return dependency


Reader = Annotated[Principal, Depends(require("read"))]
Writer = Annotated[Principal, Depends(require("write"))]
Admin = Annotated[Principal, Depends(require("admin"))]
GlobalAdmin = Annotated[Principal, Depends(require("admin", every_namespace=True))]
