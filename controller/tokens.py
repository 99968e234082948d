"""API tokens: create, look up, list, revoke. Only hashes are stored."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.schema import api_tokens
from dagsmith.errors import Conflict, NotFound

SCOPES = ("read", "write", "admin")
TOKEN_PREFIX = "dgs_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def expand_scopes(scopes: list[str]) -> set[str]:
    """admin implies write implies read."""
    granted = set(scopes)
    if "admin" in granted:
        granted |= {"write", "read"}
    if "write" in granted:
        granted.add("read")
    return granted


@dataclass(frozen=True)
class TokenRecord:
    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    namespaces: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, uuid.UUID) else v) for k, v in self.__dict__.items()}


def _record(row: Any) -> TokenRecord:
    return TokenRecord(
        row.id,
        row.name,
        row.prefix,
        list(row.scopes),
        list(row.namespaces),
        row.created_by,
        row.created_at,
        row.expires_at,
        row.last_used_at,
        row.revoked_at,
    )


async def create(
    conn: AsyncConnection,
    *,
    name: str,
    scopes: list[str],
    namespaces: list[str],
    created_by: str,
    expires_in: float | None = None,
) -> tuple[str, TokenRecord]:
    """Returns the token (shown once) and its record."""
    token = new_token()
    expires_at = datetime.now(UTC) + timedelta(seconds=expires_in) if expires_in else None
    try:
        row = (
            await conn.execute(
                sa.insert(api_tokens)
                .values(
                    id=uuid.uuid4(),
                    name=name,
                    token_hash=hash_token(token),
                    prefix=token[:10],
                    scopes=scopes,
                    namespaces=namespaces,
                    created_by=created_by,
                    expires_at=expires_at,
                )
                .returning(api_tokens)
            )
        ).one()
    except IntegrityError:
        raise Conflict(f"a token named {name!r} already exists") from None
    return token, _record(row)


async def lookup(conn: AsyncConnection, token: str) -> TokenRecord | None:
    """The live token with this value, or None (unknown, revoked or expired)."""
    row = (
        await conn.execute(
            sa.update(api_tokens)
            .where(
                api_tokens.c.token_hash == hash_token(token),
                api_tokens.c.revoked_at.is_(None),
                sa.or_(api_tokens.c.expires_at.is_(None), api_tokens.c.expires_at > sa.func.now()),
            )
            .values(last_used_at=sa.func.now())
            .returning(api_tokens)
        )
    ).first()
    return _record(row) if row else None


def covers(holder: Sequence[str], namespaces: Sequence[str]) -> bool:
    """Whether a token for ``holder``'s namespaces may manage a token for ``namespaces``: an admin
    limited to some namespaces cannot mint, see or revoke a token reaching further than its own."""
    if "*" in holder:
        return True
    return "*" not in namespaces and set(namespaces) <= set(holder)


async def list_all(conn: AsyncConnection, within: Sequence[str] = ("*",)) -> list[TokenRecord]:
    """Every token an admin for the namespaces ``within`` may manage."""
    rows = await conn.execute(sa.select(api_tokens).order_by(api_tokens.c.created_at))
    return [record for record in map(_record, rows) if covers(within, record.namespaces)]


async def revoke(conn: AsyncConnection, name_or_id: str, within: Sequence[str] = ("*",)) -> TokenRecord:
    """Revoke a live token that an admin for the namespaces ``within`` may manage; a token beyond
    them is reported as not found, like one that does not exist."""
    condition = api_tokens.c.name == name_or_id
    try:
        condition = sa.or_(condition, api_tokens.c.id == uuid.UUID(name_or_id))
    except ValueError:
        pass
    rows = (
        await conn.execute(
            sa.select(api_tokens.c.id, api_tokens.c.namespaces)
            .where(condition, api_tokens.c.revoked_at.is_(None))
            .with_for_update()
        )
    ).all()
    ids = [r.id for r in rows if covers(within, list(r.namespaces))]
    if not ids:
        raise NotFound(f"no live token is named {name_or_id!r}")
    row = (
        await conn.execute(
            sa.update(api_tokens)
            .where(api_tokens.c.id == ids[0])
            .values(revoked_at=sa.func.now())
            .returning(api_tokens)
        )
    ).one()
    return _record(row)
