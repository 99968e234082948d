"""Request dependencies: the database connection and the app's shared state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.events_hub import EventsHub
from dagsmith.settings import Settings


@dataclass
class AppState:
    settings: Settings
    db: AsyncEngine
    hub: EventsHub
    known_types: tuple[float, set[str]] = field(default=(0.0, set()))


def state(request: Request) -> AppState:
    return request.app.state.dagsmith


State = Annotated[AppState, Depends(state)]


async def connection(request: Request) -> AsyncIterator[AsyncConnection]:
    async with state(request).db.connect() as conn:
        yield conn


Conn = Annotated[AsyncConnection, Depends(connection)]
