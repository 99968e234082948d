"""/v1/policies: the correction-policy registry (admin scope)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from api.auth import GlobalAdmin
from api.deps import State
from api.models import ErrorResponse
from controller import policies

router = APIRouter(prefix="/v1/policies", tags=["policies"])


class PolicyVersion(BaseModel):
    version: str
    status: str
    feature_schema_version: int
    reward_version: str
    training: dict[str, Any]
    evaluation: dict[str, Any]
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No or bad token."},
    403: {"model": ErrorResponse, "description": "The token lacks the admin scope, or is limited to some namespaces."},
    422: {"model": ErrorResponse, "description": "Invalid request."},
}


@router.get("", response_model=list[PolicyVersion], responses=_ERRORS, summary="Policy versions, newest first")
async def list_policies(state: State, principal: GlobalAdmin) -> list[PolicyVersion]:
    async with state.db.connect() as conn:
        return [PolicyVersion(**p) for p in await policies.list_versions(conn)]


@router.post(
    "/{version}/activate",
    response_model=PolicyVersion,
    responses={**_ERRORS, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse, "description": "Gate failed."}},
    summary="Make a version the active policy (only if it passed its gate, unless force)",
)
async def activate_policy(
    version: Annotated[str, Path(max_length=100)],
    state: State,
    principal: GlobalAdmin,
    force: Annotated[bool, Query(description="Activate even though the gate failed")] = False,
) -> PolicyVersion:
    async with state.db.begin() as tx:
        return PolicyVersion(**await policies.activate(tx, version, force=force))


@router.post(
    "/rollback",
    response_model=PolicyVersion | None,
    responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "No policy is active."}},
    summary="Retire the active policy and go back to the previous one (or to the rules)",
)
async def rollback_policy(state: State, principal: GlobalAdmin) -> PolicyVersion | None:
    async with state.db.begin() as tx:
        previous = await policies.rollback(tx)
    return PolicyVersion(**previous) if previous else None
