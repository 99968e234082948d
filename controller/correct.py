"""Correction Mode, the I/O side: when an attempt fails, gather the failure context, let the
policy choose (:mod:`controller.policies`), plan the surgery (:mod:`controller.surgery`), apply
it (:mod:`controller.revisions`) and log the decision — all inside the round's transaction, so a
crash leaves either the whole correction or none of it (the result is redelivered and decided
again).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncConnection

from controller import revisions, store
from controller.correction import (
    ACTIONS,
    FEATURE_SCHEMA_VERSION,
    CorrectiveAction,
    FailureContext,
    featurize,
    limits_reached,
)
from controller.policies import Choice, PolicyBox
from controller.reconcile import Failure
from controller.store import Event, Events, Outcome, TaskRow, WorkflowRow, _json
from controller.surgery import (
    Plan,
    SurgeryError,
    TaskSnapshot,
    abort,
    insert_before,
    over_budget,
    repair_prefix,
    reroute,
    retry,
    tune,
)
from controller.surgery import skip as skip_plan
from dagsmith.spec import Backoff, CorrectionMode

log = structlog.get_logger(__name__)
A = CorrectiveAction

SURGERIES = Counter("dagsmith_surgeries_total", "DAG surgeries applied, by action and reason.", ["action", "reason"])
DECISIONS = Counter("dagsmith_policy_decisions_total", "Correction decisions.", ["action", "policy_version", "mode"])
SHADOW_DECISIONS = Counter(
    "dagsmith_policy_shadow_decisions_total",
    "Shadow-mode decisions: agreed is true or false, or fallback when the shadow policy fell back to the rules.",
    ["agreed"],
)
SHADOW_AGREEMENT = Gauge(
    "dagsmith_policy_shadow_agreement_ratio",
    "Share of shadow decisions where the learned policy agreed (NaN until this controller made one).",
)
SHADOW_AGREEMENT.set(float("nan"))  # no shadow decision yet is no data, not 0% agreement
for _agreed in ("true", "false", "fallback"):  # at 0 from the start, so the first one is an increase
    SHADOW_DECISIONS.labels(_agreed)
ACTIVE_VERSION = Gauge("dagsmith_policy_active_version", "1 for the active learned policy version.", ["version"])


class FailureRates:
    """Recent failure rate per task type (the last 200 evaluated attempts), for the context."""

    def __init__(self, window: int = 200) -> None:
        self.window = window
        self.outcomes: dict[str, deque[bool]] = defaultdict(lambda: deque(maxlen=self.window))

    def observe(self, task_type: str, failed: bool) -> None:
        self.outcomes[task_type].append(failed)

    def rate(self, task_type: str) -> float:
        seen = self.outcomes.get(task_type)
        return sum(seen) / len(seen) if seen else 0.0


@dataclass
class RoundBudget:
    """Surgeries and inserts applied in this round, per workflow (not yet on the locked row)."""

    surgeries: dict[uuid.UUID, int] = field(default_factory=lambda: defaultdict(int))
    inserted: dict[uuid.UUID, int] = field(default_factory=lambda: defaultdict(int))


@dataclass(frozen=True)
class Corrected:
    action: CorrectiveAction
    revision: int
    aborted: bool


class Corrector:
    def __init__(self, policies: PolicyBox) -> None:
        self.policies = policies
        self.rates = FailureRates()
        self._capabilities: dict[str, dict[str, Any]] = {}
        self._capabilities_at = 0.0
        self._agreed = 0
        self._shadowed = 0

    async def _capability(self, conn: AsyncConnection, task_type: str) -> dict[str, Any]:
        if time.monotonic() - self._capabilities_at > 30 or task_type not in self._capabilities:
            rows = await conn.execute(sa.text("SELECT type, capability FROM task_types"))
            self._capabilities = {r.type: r.capability for r in rows}
            self._capabilities_at = time.monotonic()
        return self._capabilities.get(task_type, {})

    async def correct(
        self,
        conn: AsyncConnection,
        workflow: WorkflowRow,
        task: TaskRow,
        failure: Failure,
        outcome: Outcome,
        now: float,
        events: Events,
        budget: RoundBudget,
    ) -> Corrected:
        snap = await revisions.snapshot(conn, workflow.id, task.name)
        capability = await self._capability(conn, task.type)
        # The spec's fallbacks first (the workflow's author knows best), then those its executors declare.
        declared = [*(snap.spec.get("fallback") or []), *(capability.get("fallback") or [])]
        fallbacks = [t for t in dict.fromkeys(declared) if t != snap.type]
        tuned_params, tuned_timeout = _tuned(snap, capability.get("tunable") or {}, task.timeout_s)
        surgeries = workflow.surgeries + budget.surgeries[workflow.id]
        inserted = workflow.inserted_tasks + budget.inserted[workflow.id]
        correction = workflow.correction
        ctx = FailureContext(
            error_class=str(failure.error_class),
            task_type=task.type,
            attempt=max(task.attempt, 1),
            retries_used=task.retries,
            max_retries=max(task.max_retries, correction.max_retries),
            surgeries_used=surgeries,
            max_surgeries=correction.max_surgeries,
            inserted_used=inserted,
            max_inserted=correction.max_inserted_tasks,
            reward=outcome.reward if outcome.reward is not None else -1.0,
            upstream_reward=await self._upstream_reward(conn, workflow.id, snap.depends_on),
            duration_ratio=_duration_ratio(outcome, task.timeout_s),
            executor_failure_rate=self.rates.rate(task.type),
            has_fallback=bool(fallbacks),
            has_repair=bool(capability.get("repair")),
            has_tunable=tuned_params is not None or tuned_timeout is not None,
            optional=snap.optional,
            progress=_progress(workflow),
            time_budget_used=_time_used(workflow, now),
            tried=await self._tried(conn, task.id),
        )
        choice = self.policies.choose(correction.mode, ctx)
        self._record_shadow(choice)
        action = choice.decision.action
        spent = 0.0 if outcome.started_at is None else max(outcome.finished_at - outcome.started_at, 0.0)
        taken = (
            await revisions.names_like(conn, workflow.id, repair_prefix(task.name))
            if action == A.insert_repair
            else set()
        )
        chosen = action
        stop: str | None = None
        try:
            plan = self._plan(action, snap, task, capability, fallbacks, tuned_params, tuned_timeout, taken)
        except SurgeryError as exc:
            log.warning("planned surgery impossible; aborting", action=str(action), error=str(exc))
            plan, stop = abort(snap), str(exc)
            choice = choice.overridden(f"impossible: {exc}")
        stop = stop or over_budget(
            correction,
            surgeries=surgeries,
            inserted=inserted,
            elapsed=now - (workflow.started_at or now),
            task_seconds=workflow.task_seconds + spent,  # the failed attempt counts too
            plan=plan,
        )
        if stop and action not in (A.skip, A.abort):
            plan = abort(snap)
            if choice.decision.action != A.abort:
                choice = choice.overridden(f"budget: {stop}")
        action = choice.decision.action
        reason = {
            "error_class": str(failure.error_class),
            "message": failure.message[:500],
            "action": str(action),
            "policy": choice.decision.policy_version,
            "mode": str(choice.mode),
            "fallback_reason": choice.decision.fallback_reason,
            "feedback": outcome.feedback,
            "budget": stop,
            "overrode": str(chosen) if chosen != action else None,
            "explored": str(choice.proposed) if choice.explored else None,  # the policy's own choice
        }
        applied = await revisions.apply(
            conn, workflow.id, snap, plan, actor=choice.actor, reason=reason, now=now, events=events, outcome=outcome
        )
        budget.surgeries[workflow.id] += 1
        budget.inserted[workflow.id] += plan.inserts
        aborted = plan.operation == "abort"
        if aborted:
            limits = limits_reached(ctx)
            if limits:  # what else it might have done is out of the budget
                reason_text = f"{choice.actor} aborted: the correction budget is spent ({'; '.join(limits)})"
            else:
                reason_text = f"{choice.actor} found no corrective action worth trying, and aborted"
            message = stop or reason_text
            for row in await store.abort_workflow(conn, workflow.id, now, task.name, message, failure):
                events.add(
                    Event(
                        workflow.id,
                        "cancelled",
                        row.id,
                        row.name,
                        row.attempt,
                        row.old_status,
                        at=now,
                        reason="workflow aborted by correction",
                    )
                )
            events.add(
                Event(
                    workflow.id,
                    "failed",
                    from_status=str(workflow.status),
                    at=now,
                    reason="aborted",
                    data={"message": message, "task": task.name},
                )
            )
        await self._log(conn, workflow, task, ctx, choice, applied.revision, plan, now, spent)
        if aborted:
            # A repair task that ends like this failed the decision that inserted it: that is its
            # outcome, known now (not one to leave out as censored below).
            await close_repaired(conn, workflow.id, task.name, now, spent)
            # Decisions on the workflow's other tasks will never learn their outcome.
            await close_unresolved(conn, "workflow_aborted", now, workflow_ids=[workflow.id])
        SURGERIES.labels(plan.operation.value if aborted else str(action), str(failure.error_class)).inc()
        DECISIONS.labels(str(action), choice.decision.policy_version, str(choice.mode)).inc()
        log.info(
            "corrected",
            workflow_id=str(workflow.id),
            task_id=task.id,
            attempt=task.attempt,
            task=task.name,
            error_class=str(failure.error_class),
            action=str(action),
            revision=applied.revision,
            policy=choice.decision.policy_version,
        )
        return Corrected(action, applied.revision, aborted)

    def _plan(
        self,
        action: CorrectiveAction,
        snap: TaskSnapshot,
        task: TaskRow,
        capability: dict[str, Any],
        fallbacks: list[str],
        tuned_params: dict[str, Any] | None,
        tuned_timeout: float | None,
        taken: set[str],
    ) -> Plan:
        if action == A.retry_now:
            return retry(snap)
        if action == A.retry_backoff:
            backoff = Backoff.model_validate((snap.spec.get("retry") or {}).get("backoff") or {})
            return retry(snap, delay=backoff.delay(task.retries + 1))
        if action == A.retry_tuned:
            return retry(snap, params=tuned_params, timeout=tuned_timeout, old_timeout=task.timeout_s)
        if action == A.reroute:
            return reroute(snap, fallbacks[0])
        if action == A.insert_repair:
            return insert_before(snap, task_type=capability["repair"], existing=taken)
        if action == A.skip:
            return skip_plan(snap)
        return abort(snap)

    async def _upstream_reward(self, conn: AsyncConnection, workflow_id: uuid.UUID, deps: list[str]) -> float | None:
        if not deps:
            return None
        value = (
            await conn.execute(
                sa.text("SELECT avg(reward) FROM tasks WHERE workflow_id = :w AND name = ANY(:deps)"),
                {"w": workflow_id, "deps": deps},
            )
        ).scalar()
        return None if value is None else float(value)

    async def _tried(self, conn: AsyncConnection, task_id: int) -> tuple[int, ...]:
        rows = await conn.execute(
            sa.text("SELECT action, count(*) FROM correction_decisions WHERE task_id = :t GROUP BY action"),
            {"t": task_id},
        )
        counts: dict[str, int] = {str(r[0]): int(r[1]) for r in rows}
        return tuple(int(counts.get(str(a), 0)) for a in ACTIONS)

    async def _log(
        self,
        conn: AsyncConnection,
        workflow: WorkflowRow,
        task: TaskRow,
        ctx: FailureContext,
        choice: Choice,
        revision: int,
        plan: Plan,
        now: float,
        spent: float,
    ) -> None:
        """Record the decision, and close the previous one on this task: it did not fix it, and
        the attempt it led to ran for ``spent`` seconds (what it cost, for the learner)."""
        d = choice.decision
        shadow = choice.shadow
        new_id = (
            await conn.execute(
                sa.text(
                    """
                    INSERT INTO correction_decisions
                        (workflow_id, task_id, task_name, task_type, attempt, error_class, mode, policy_version,
                         feature_schema_version, features, observation, mask, action, probability, probabilities,
                         behaviour, explored, fallback_reason, shadow_action, shadow_policy_version,
                         shadow_probabilities, revision, outcome, outcome_at, created_at)
                    VALUES (:w, :t, :name, :type, :attempt, :error_class, :mode, :version, :schema,
                            CAST(:features AS jsonb), :obs, :mask, :action, :p, :probs, :behaviour, :explored,
                            :fallback, :s_action, :s_version, :s_probs, :revision, CAST(:outcome AS jsonb),
                            CASE WHEN :outcome IS NULL THEN NULL ELSE to_timestamp(:now) END, to_timestamp(:now))
                    RETURNING id
                    """
                ),
                {
                    "w": workflow.id,
                    "t": task.id,
                    "name": task.name,
                    "type": task.type,
                    "attempt": task.attempt,
                    "error_class": ctx.error_class,
                    "mode": str(choice.mode),
                    "version": d.policy_version,
                    "schema": FEATURE_SCHEMA_VERSION,
                    "features": _json(ctx.to_dict()),
                    "obs": featurize(ctx),
                    "mask": list(d.mask),
                    "action": str(d.action),
                    "p": choice.propensity,
                    "probs": list(d.probabilities),
                    "behaviour": list(choice.distribution),
                    "explored": choice.explored,
                    "fallback": d.fallback_reason,
                    "s_action": str(shadow.action) if shadow else None,
                    "s_version": shadow.policy_version if shadow else None,
                    "s_probs": list(shadow.probabilities) if shadow else None,
                    "revision": revision,
                    # skip and abort end the correction of this task at once
                    "outcome": _json(
                        {
                            "fixed": False,
                            "ended": plan.operation.value,
                            "task_seconds": 0.0,
                            "latency_added": 0.0,
                            "inserted": 0,
                        }
                    )
                    if plan.operation.value in ("skip", "abort")
                    else None,
                    "now": now,
                },
            )
        ).scalar_one()
        # The previous decision on this task did not fix it: this one follows it up.
        await conn.execute(
            sa.text(
                """
                UPDATE correction_decisions SET outcome = jsonb_build_object(
                        'fixed', false, 'follow_up', CAST(:new AS bigint),
                        'task_seconds', :seconds, 'latency_added', :now - extract(epoch FROM created_at),
                        'inserted', CASE WHEN action = 'insert_repair' THEN 1 ELSE 0 END),
                    outcome_at = to_timestamp(:now)
                WHERE task_id = :t AND outcome IS NULL AND id <> :new
                """
            ),
            {"t": task.id, "new": new_id, "now": now, "seconds": spent},
        )

    def _record_shadow(self, choice: Choice) -> None:
        if choice.shadow is None:
            return
        if choice.shadow.fallback_reason is not None:
            # The shadow policy fell back to the rules: agreeing with them says nothing about it.
            SHADOW_DECISIONS.labels("fallback").inc()
            return
        agreed = choice.shadow.action == (choice.proposed or choice.decision.action)
        self._shadowed += 1
        self._agreed += int(agreed)
        SHADOW_DECISIONS.labels(str(agreed).lower()).inc()
        SHADOW_AGREEMENT.set(self._agreed / self._shadowed)


def _duration_ratio(outcome: Outcome, timeout: float | None) -> float | None:
    if not timeout or outcome.started_at is None:
        return None
    return max(outcome.finished_at - outcome.started_at, 0.0) / timeout


def _progress(workflow: WorkflowRow) -> float:
    c = workflow.counts
    return (c.succeeded + c.skipped) / c.total if c.total else 0.0


def _tuned(
    snap: TaskSnapshot, tunable: dict[str, str], timeout: float | None
) -> tuple[dict[str, Any] | None, float | None]:
    """The params a tuned retry sets (only those the tuning changed, tuned from the values the
    failed attempt ran with) and its new timeout."""
    ran_with = snap.resolved if snap.resolved is not None else snap.params
    tuned, new_timeout = tune(ran_with, tunable, timeout)
    changed = {k: v for k, v in (tuned or {}).items() if ran_with.get(k) != v}
    return (changed or None), new_timeout


def _time_used(workflow: WorkflowRow, now: float) -> float | None:
    budget = workflow.correction.time_budget
    if budget is None or workflow.started_at is None:
        return None
    # Validation refuses a zero budget; one stored before it did is wholly used, not a crash.
    return (now - workflow.started_at) / budget if budget > 0 else 1.0


async def close_fixed(conn: AsyncConnection, fixed: list[tuple[int, float, float]]) -> None:
    """Tasks that just succeeded: their open correction decisions worked.

    ``fixed`` holds (task_id, run seconds of the fixing attempt, finished_at).
    """
    if not fixed:
        return
    await conn.execute(
        sa.text(
            """
            UPDATE correction_decisions d SET outcome = jsonb_build_object(
                    'fixed', true, 'task_seconds', v.seconds,
                    'latency_added', v.finished - extract(epoch FROM d.created_at),
                    'inserted', CASE WHEN d.action = 'insert_repair' THEN 1 ELSE 0 END),
                outcome_at = now()  -- when it became known here, as for the others (the trainer counts by it)
            FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(id bigint, seconds float8, finished float8)
            WHERE d.task_id = v.id AND d.outcome IS NULL
            """
        ),
        {"rows": store.rows_json({"id": i, "seconds": s, "finished": f} for i, s, f in fixed)},
    )


async def close_repaired(
    conn: AsyncConnection, workflow_id: uuid.UUID, repair: str, now: float, seconds: float
) -> None:
    """The repair task ``repair`` failed for good: the ``insert_repair`` decisions that inserted it
    did not fix their task (and cost the repair's last attempt and the task it inserted)."""
    await conn.execute(
        sa.text(
            """
            UPDATE correction_decisions d SET outcome = jsonb_build_object(
                    'fixed', false, 'ended', 'repair_failed', 'task_seconds', CAST(:seconds AS float8),
                    'latency_added', CAST(:now AS float8) - extract(epoch FROM d.created_at), 'inserted', 1),
                outcome_at = to_timestamp(:now)
            FROM tasks t
            WHERE t.workflow_id = :w AND t.spec->>'repairedBy' = :repair
              AND d.task_id = t.id AND d.action = 'insert_repair' AND d.outcome IS NULL
            """
        ),
        {"w": workflow_id, "repair": repair, "now": now, "seconds": seconds},
    )


async def close_unresolved(
    conn: AsyncConnection,
    ended: str,
    now: float,
    *,
    workflow_ids: Sequence[uuid.UUID] = (),
    task_id: int | None = None,
) -> None:
    """Decisions that will never learn their outcome — their workflow ended first (cancelled,
    aborted over another task, finished), or a user's surgery took over their task — are closed
    as censored, so none stays open for ever. The learner leaves them out (what the action would
    have led to is unknown) rather than counting them as fixes or failures."""
    if not workflow_ids and task_id is None:
        return
    which = "task_id = :task" if task_id is not None else "workflow_id = ANY(:ids)"
    await conn.execute(
        sa.text(
            f"""
            UPDATE correction_decisions SET outcome = jsonb_build_object(
                    'fixed', false, 'ended', CAST(:ended AS text), 'censored', true, 'task_seconds', 0,
                    'latency_added', :now - extract(epoch FROM created_at), 'inserted', 0),
                outcome_at = to_timestamp(:now)
            WHERE {which} AND outcome IS NULL
            """
        ),
        {"ids": list(workflow_ids), "task": task_id, "ended": ended, "now": now},
    )


__all__ = [
    "CorrectionMode",
    "Corrector",
    "FailureRates",
    "RoundBudget",
    "close_fixed",
    "close_repaired",
    "close_unresolved",
]
