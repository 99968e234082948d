"""The policy registry (Postgres) and the policies a controller decides with, reloaded live.

Versions live in ``policies``: weights, feature schema, reward version, training data window and
evaluation report. At most one is ``active``. Activating one NOTIFYs every controller, which loads
it without a restart; a periodic check catches a missed notification.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.correction import (
    ACTIONS,
    FEATURE_SCHEMA_VERSION,
    CorrectiveAction,
    FailureContext,
    RulesPolicy,
    learned_available,
    load_learned_policy,
)
from controller.correction.explore import behaviour, explore, share
from controller.correction.policy import Decision, Policy, one_hot
from controller.db import in_transaction
from controller.schema import policies, policy_activations
from dagsmith.errors import Conflict, NotFound
from dagsmith.spec import CorrectionMode

log = structlog.get_logger(__name__)
CHANNEL_POLICIES = "dagsmith_policies"


@dataclass(frozen=True)
class Choice:
    decision: Decision  # what is done
    shadow: Decision | None  # shadow mode: what the learned policy would have done
    mode: CorrectionMode
    # The distribution the controller actually acted from (the propensities the off-policy
    # estimate divides by): one-hot for a deterministic choice (rules, argmax), the policy's own
    # when it samples, mixed with exploration (controller.correction.explore). None: one-hot.
    behaviour: tuple[float, ...] | None = None
    explored: bool = False  # the action was drawn by exploration, not chosen by the policy
    proposed: CorrectiveAction | None = None  # when explored: what the policy chose

    @property
    def propensity(self) -> float:
        """The probability with which the action taken was taken."""
        if self.behaviour is None:
            return 1.0
        return self.behaviour[self.decision.action.ordinal]

    @property
    def distribution(self) -> tuple[float, ...]:
        return self.behaviour if self.behaviour is not None else one_hot(self.decision.action)

    def overridden(self, reason: str) -> Choice:
        """What is logged when the controller aborts instead of the chosen action (a budget ran
        out, or the surgery proved impossible): the abort that was taken, with certainty, and why
        — not the choice it replaced, which the learner would otherwise blame for the failure."""
        d = self.decision
        certain = tuple(1.0 if a == CorrectiveAction.abort else 0.0 for a in ACTIONS)
        forced = Decision(CorrectiveAction.abort, certain, 1.0, d.mask, d.policy_version, reason)
        return Choice(forced, self.shadow, self.mode)

    @property
    def actor(self) -> str:
        version = self.decision.policy_version
        return "rules" if version.startswith("rules") else f"policy:{version}"


class PolicyBox:
    """The rules, and the active learned policy if there is one (swapped in place on reload).

    ``exploration``: the share of decisions on which another recovery action is tried
    (:mod:`controller.correction.explore`); ``rng`` draws them (seeded in tests)."""

    def __init__(self, exploration: float = 0.0, rng: random.Random | None = None) -> None:
        self.rules = RulesPolicy()
        self.exploration = exploration
        self.rng = rng or random.Random()
        self.learned: Policy | None = None  # None: the rules decide
        self.version: str | None = None  # the registry's active version, loaded or not
        self.checked_at = 0.0

    async def refresh(self, db: AsyncEngine, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.checked_at < 30:
            return
        self.checked_at = time.monotonic()

        async def active(conn: AsyncConnection) -> Any:
            query = sa.select(policies.c.version, policies.c.weights).where(policies.c.status == "active")
            return (await conn.execute(query)).first()

        row = await in_transaction(db, active, what="policy refresh", attempts=3)
        if row is None:
            if self.version is not None:
                log.info("no active policy any more: deciding with the rules")
            self.learned, self.version = None, None
            return
        if row.version == self.version:
            return
        if not learned_available():
            log.warning(
                "an active learned policy exists but torch is not installed; deciding with the rules",
                version=row.version,
            )
            return
        try:
            self.learned = load_learned_policy(bytes(row.weights), row.version)
            log.info("active policy loaded", version=row.version)
        except Exception:
            # Not the version before it either: that one was retired. A version's weights never
            # change, so it is not tried again until another version is activated.
            self.learned = None
            log.exception("could not load the active policy; deciding with the rules", version=row.version)
        self.version = row.version

    def choose(self, mode: CorrectionMode, ctx: FailureContext) -> Choice:
        shadow = None
        if mode == CorrectionMode.learned:
            if self.learned is None:
                decision = self.rules.decide(ctx, fallback_reason="no_active_policy")
            else:
                decision = self.learned.decide(ctx)
        else:
            decision = self.rules.decide(ctx)
            if mode == CorrectionMode.shadow and self.learned is not None:
                shadow = self.learned.decide(ctx)
        epsilon = share(ctx, self.exploration)
        acted = behaviour(decision, epsilon)
        explored = explore(decision, epsilon, self.rng)
        if explored is None:
            return Choice(decision, shadow, mode, acted)
        return Choice(explored, shadow, mode, acted, explored=True, proposed=decision.action)


# --- The registry: what `dagsmith policy` and the trainer use. ---


def _summary(row: Any) -> dict[str, Any]:
    return {
        "version": row.version,
        "status": row.status,
        "feature_schema_version": row.feature_schema_version,
        "reward_version": row.reward_version,
        "training": row.training,
        "evaluation": row.evaluation,
        "created_at": row.created_at,
        "activated_at": row.activated_at,
        "retired_at": row.retired_at,
    }


async def register(
    conn: AsyncConnection,
    *,
    version: str,
    weights: bytes,
    feature_schema_version: int,
    reward_version: str,
    training: dict[str, Any],
    evaluation: dict[str, Any],
) -> None:
    await conn.execute(
        sa.insert(policies).values(
            version=version,
            status="candidate",
            weights=weights,
            feature_schema_version=feature_schema_version,
            reward_version=reward_version,
            training=_jsonable(training),
            evaluation=_jsonable(evaluation),
        )
    )


def _jsonable(value: dict[str, Any]) -> Any:
    return orjson.loads(orjson.dumps(value, default=str, option=orjson.OPT_SERIALIZE_NUMPY))


async def list_versions(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = await conn.execute(sa.select(policies).order_by(policies.c.created_at.desc()))
    return [_summary(r) for r in rows]


async def active(conn: AsyncConnection) -> dict[str, Any] | None:
    row = (await conn.execute(sa.select(policies).where(policies.c.status == "active"))).first()
    return _summary(row) if row else None


async def weights_of(conn: AsyncConnection, version: str) -> bytes:
    row = (await conn.execute(sa.select(policies.c.weights).where(policies.c.version == version))).first()
    if row is None:
        raise NotFound(f"no policy version {version!r}")
    return bytes(row.weights)


_UNCHECKED = object()


async def activate(
    conn: AsyncConnection, version: str, *, force: bool = False, replacing: object = _UNCHECKED
) -> dict[str, Any]:
    """Make ``version`` the active policy. Only versions whose gate passed, unless ``force``.

    ``replacing``: the version the gate compared it with (None: the rules). If another is active
    by now (someone activated or rolled back meanwhile), nothing changes: the gate never compared
    the two, and a person's later decision must not be undone by an older training run."""
    await _one_change_at_a_time(conn)
    row = (await conn.execute(sa.select(policies).where(policies.c.version == version))).first()
    if row is None:
        raise NotFound(f"no policy version {version!r}")
    if replacing is not _UNCHECKED:
        current = (await conn.execute(sa.select(policies.c.version).where(policies.c.status == "active"))).scalar()
        if current != replacing:
            raise Conflict(
                f"the active policy changed to {current or 'the rules'} while {version} was compared with "
                f"{replacing or 'the rules'}; it stays a candidate (activate it by hand if wanted)"
            )
    if not force and row.feature_schema_version != FEATURE_SCHEMA_VERSION:
        raise Conflict(
            f"policy {version} reads features of schema version {row.feature_schema_version}, these controllers "
            f"version {FEATURE_SCHEMA_VERSION}: it would never decide (the rules would, in its name); "
            "activate it anyway with force"
        )
    gate = (row.evaluation or {}).get("gate", {})
    if not force and not gate.get("passed"):
        raise Conflict(
            f"policy {version} did not pass the gate ({gate.get('reason', 'no gate report')}); "
            "activate it anyway with force"
        )
    if row.status != "active":
        await conn.execute(sa.insert(policy_activations).values(version=version))
    await _make_active(conn, version)
    return await active(conn) or {}


async def rollback(conn: AsyncConnection) -> dict[str, Any] | None:
    """Undo the latest activation still standing: the version active before it comes back (or
    none: the rules). Successive rollbacks walk back through the activations, newest first."""
    await _one_change_at_a_time(conn)
    current = (await conn.execute(sa.select(policies).where(policies.c.status == "active"))).first()
    if current is None:
        raise Conflict("no policy is active: the controllers already decide with the rules")
    standing = (
        sa.select(policy_activations.c.id, policy_activations.c.version)
        .where(~policy_activations.c.undone)
        .order_by(policy_activations.c.id.desc())
        .limit(2)
    )
    rows = (await conn.execute(standing)).all()
    if rows and rows[0].version == current.version:
        await conn.execute(
            sa.update(policy_activations)
            .where(policy_activations.c.id == rows[0].id)
            .values(undone=True, undone_at=sa.func.now())
        )
        rows = rows[1:]
    previous = rows[0].version if rows else None
    await _make_active(conn, previous)
    return await active(conn)


POLICY_CHANGES_LOCK = 0x64616773_706F6C  # an advisory lock id of the registry's own ("dags" "pol")


async def _one_change_at_a_time(conn: AsyncConnection) -> None:
    """Activations and rollbacks take turns (until the transaction ends): each then judges the
    active version as it is, and two never both find none active and both activate (the unique
    index would refuse the second with an error instead of a reason)."""
    await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(POLICY_CHANGES_LOCK)))


async def _make_active(conn: AsyncConnection, version: str | None) -> None:
    """Retire whatever is active and activate ``version`` (none: the rules decide); tell every
    controller to reload."""
    others = policies.c.status == "active"
    if version is not None:
        others &= policies.c.version != version
    await conn.execute(sa.update(policies).where(others).values(status="retired", retired_at=sa.func.now()))
    if version is not None:
        await conn.execute(
            sa.update(policies)
            .where(policies.c.version == version, policies.c.status != "active")
            .values(status="active", activated_at=sa.func.now())
        )
    await conn.execute(sa.select(sa.func.pg_notify(CHANNEL_POLICIES, version or "")))
