"""/v1/tokens: create, list and revoke API tokens (admin scope)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field, field_validator

from api.auth import Admin
from api.deps import State
from api.models import ErrorResponse
from controller import tokens
from dagsmith.durations import parse_duration

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
MAX_TOKEN_LIFETIME = 3650 * 86400.0  # ten years: longer is a typo (and "never" is no expiry at all)


class TokenRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        # The bootstrap token acts as "admin" (user:admin in revisions); a stored token of that
        # name would be indistinguishable from it in the history. A token id in the shape of a
        # UUID would make `revoke NAME_OR_ID` ambiguous.
        if name.lower() == "admin":
            raise ValueError("'admin' is the bootstrap token's name; choose another")
        try:
            uuid.UUID(name)
        except ValueError:
            return name
        raise ValueError("a name may not look like a token id (a UUID)")

    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1)
    namespaces: list[str] = Field(min_length=1, max_length=100, description="Namespaces the token sees; ['*'] for all.")
    expires_in: str | None = Field(None, description="A duration (e.g. '30d', at most 3650d), or none for no expiry.")


class Token(BaseModel):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    namespaces: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class CreatedToken(Token):
    token: str = Field(description="The secret. It is shown only now; only its hash is stored.")


_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "The body could not be read (not JSON, not UTF-8)."},
    401: {"model": ErrorResponse, "description": "No or bad token."},
    422: {"model": ErrorResponse, "description": "Invalid request."},
    403: {"model": ErrorResponse, "description": "The token lacks the admin scope, or the namespaces asked for."},
}


@router.post(
    "",
    status_code=201,
    response_model=CreatedToken,
    responses={**_ERRORS, 409: {"model": ErrorResponse}},
    summary="Create a token (shown once)",
)
async def create_token(body: TokenRequest, state: State, principal: Admin) -> CreatedToken:
    from api.errors import APIError

    for ns in body.namespaces:
        if ns != "*" and not ns.replace("-", "").isalnum():
            raise APIError(422, "invalid_request", f"namespace {ns!r} is not a valid namespace name")
    if not tokens.covers(principal.namespaces, body.namespaces):
        raise APIError(
            403,
            "forbidden",
            f"this token may only create tokens for its own namespaces {list(principal.namespaces)}, "
            f"not for {body.namespaces}",
        )
    try:
        expires = parse_duration(body.expires_in, maximum=MAX_TOKEN_LIFETIME) if body.expires_in else None
    except ValueError as exc:
        raise APIError(422, "invalid_request", f"expires_in: {exc}") from exc
    async with state.db.begin() as tx:
        token, record = await tokens.create(
            tx,
            name=body.name,
            scopes=list(body.scopes),
            namespaces=body.namespaces,
            created_by=principal.actor,
            expires_in=expires,
        )
    return CreatedToken(token=token, **record.as_json())


@router.get("", response_model=list[Token], responses=_ERRORS, summary="List tokens (never their secrets)")
async def list_tokens(state: State, principal: Admin) -> list[Token]:
    async with state.db.connect() as conn:
        return [Token(**r.as_json()) for r in await tokens.list_all(conn, principal.namespaces)]


@router.delete(
    "/{name_or_id}",
    response_model=Token,
    responses={**_ERRORS, 404: {"model": ErrorResponse}},
    summary="Revoke a token",
)
async def revoke_token(name_or_id: Annotated[str, Path(max_length=100)], state: State, principal: Admin) -> Token:
    async with state.db.begin() as tx:
        return Token(**(await tokens.revoke(tx, name_or_id, principal.namespaces)).as_json())
