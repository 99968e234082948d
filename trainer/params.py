"""The failure-injection simulator's parameters: latent failure modes and what they look like.

A failing task has one *latent* failure mode. The mode decides which corrective actions work;
the controller never sees it. It sees an error class, which several modes share (a ``timeout``
comes from a slow transient, a degraded executor or a task outgrowing its limits), and context
that carries real but noisy signal about the mode:

=================  =============================  ===========================================
mode               what fixes it                  signal beyond the error class
=================  =============================  ===========================================
transient          any re-run (retry_now cheap)   low executor failure rate, fails early
rate_limited       waiting (retry_backoff)        medium failure rate, fails instantly,
                                                  mostly ``http.*`` tasks
degraded_executor  another executor (reroute)     high executor failure rate
bad_input          repairing input (insert_repair) low upstream reward, parse-like task types
resource           more room (retry_tuned)        fails late (duration near the timeout),
                                                  heavy task types (``ml.*``, ``db.*``)
permanent          nothing: skip if optional,     nothing distinctive but the error classes;
                   else abort early               normal upstream reward
=================  =============================  ===========================================

Generative story of one episode (one failed task), all drawn from the episode's own generator:
mode ~ ``mix``; task type ~ ``type_given_mode[mode]``; the type fixes cost, repair and tunable
parameters; fallback and optional are drawn per task; budgets and time budget are drawn from
small sets; executor failure rate ~ Beta(``failure_rate[mode]``); upstream reward ~
Normal(``upstream[mode]``) (absent for 20% of tasks); the workflow's progress ~
Uniform(``progress``). At every decision step a fresh error class ~ ``error_given_mode[mode]`` and
duration ratio (1.0 for timeouts, else Uniform(``duration[mode]``)) are observed. A re-running
action succeeds with probability ``success[mode][action]``, the same at every step (documented
simplification: a failed reroute does not make later retries healthier).

Reward of an episode (``RewardWeights``; success dominates, so it is a guardrail and not just a
term):  ``R = 1.0 * fixed + 0.4 * skipped - 0.25 * failed_reruns - 0.002 * task_seconds
- 0.001 * latency_s - 0.05 * inserted_tasks``, where ``failed_reruns`` counts the recovery actions
that ran the task again without fixing it. A failed task (abort, budgets exhausted) earns 0 less
its costs and those charges.

Per-action costs, with ``S`` the task type's run time in seconds: retry_now ``S``; retry_backoff
``S`` plus a wait of ``20 s * 2**k`` (``k`` earlier backoffs); retry_tuned ``1.5 S`` (timeout x2,
smaller batches); reroute ``1.3 S`` plus 5 s of latency; insert_repair ``S + 0.3 S + 2 s`` and one
inserted task. Costs are deterministic given the type, so only the outcomes and observations are
random — which keeps the oracle's dynamic programme exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from controller.correction.actions import CorrectiveAction

A = CorrectiveAction


class Mode(StrEnum):
    transient = "transient"
    rate_limited = "rate_limited"
    degraded_executor = "degraded_executor"
    bad_input = "bad_input"
    resource = "resource"
    permanent = "permanent"


MODES: tuple[Mode, ...] = tuple(Mode)
# Actions that re-run the task and so can fix it; skip and abort end the episode at once.
RERUN_ACTIONS: tuple[CorrectiveAction, ...] = (A.retry_now, A.retry_backoff, A.retry_tuned, A.reroute, A.insert_repair)


@dataclass(frozen=True)
class TaskTypeProfile:
    seconds: float  # task-seconds of one run
    has_repair: bool
    has_tunable: bool
    p_fallback: float  # share of tasks of this type that declare a fallback capability
    p_optional: float  # share that are optional (have a default)


@dataclass(frozen=True)
class RewardWeights:
    fixed: float = 1.0
    skipped: float = 0.4
    failed: float = 0.0
    per_task_second: float = 0.002
    per_latency_second: float = 0.001
    per_inserted_task: float = 0.05
    # Charged for every re-run that does not fix the task. The evaluator scores a failed attempt -1
    # into a workflow's reward; without a charge a hopeless retry costs only its seconds, and a
    # policy trained on it retried more than the workflows' reward repays. A quarter keeps a fix
    # worth four failed attempts (success still dominates); see project_logs/experiments/closed_loop.md
    # for the charges measured.
    failed_attempt: float = 0.25

    def formula(self) -> str:
        """The episode reward as a formula, for reports."""
        return (
            f"{self.fixed:g} * fixed + {self.skipped:g} * skipped - {self.failed_attempt:g} * failed_reruns "
            f"- {self.per_task_second:g} * task_seconds - {self.per_latency_second:g} * latency_s "
            f"- {self.per_inserted_task:g} * inserted_tasks"
        )


@dataclass(frozen=True)
class CostModel:
    tuned_factor: float = 1.5
    reroute_factor: float = 1.3
    reroute_latency: float = 5.0
    repair_factor: float = 0.3
    repair_seconds: float = 2.0
    backoff_initial: float = 20.0
    backoff_factor: float = 2.0


def _norm(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return {k: v / total for k, v in weights.items()}


def _default_types() -> dict[str, TaskTypeProfile]:
    return {
        "http.fetch": TaskTypeProfile(4.0, False, False, 0.7, 0.3),
        "json.parse": TaskTypeProfile(2.0, True, False, 0.2, 0.3),
        "ml.infer": TaskTypeProfile(90.0, False, True, 0.6, 0.2),
        "db.query": TaskTypeProfile(20.0, False, True, 0.5, 0.1),
        "text.render": TaskTypeProfile(3.0, True, False, 0.3, 0.6),
        "report.build": TaskTypeProfile(40.0, True, True, 0.4, 0.3),
    }


def _default_type_given_mode() -> dict[str, dict[str, float]]:
    rows = {
        #                   http  json  ml   db   text report
        Mode.transient: (3.0, 1.0, 1.0, 2.0, 1.0, 1.0),
        Mode.rate_limited: (5.0, 0.0, 2.0, 1.0, 0.0, 0.5),
        Mode.degraded_executor: (2.0, 1.0, 3.0, 2.0, 1.0, 1.0),
        Mode.bad_input: (0.5, 4.0, 1.0, 1.0, 3.0, 2.0),
        Mode.resource: (0.3, 0.5, 4.0, 3.0, 0.3, 3.0),
        Mode.permanent: (1.0, 2.0, 1.0, 1.0, 2.0, 1.0),
    }
    names = list(_default_types())
    return {str(m): _norm(dict(zip(names, w, strict=True))) for m, w in rows.items()}


def _by_name(table: dict[Any, Any]) -> dict[str, Any]:
    """Plain string keys (not enum members), so params round-trip through JSON unchanged."""
    return {str(k): v for k, v in table.items()}


def _default_errors() -> dict[str, dict[str, float]]:
    # Many executors cannot classify their failures: "unknown" is 40% of every mode's reports.
    return _by_name(
        {
            Mode.transient: {"transient": 0.25, "unavailable": 0.15, "timeout": 0.1, "lost": 0.1, "unknown": 0.4},
            Mode.rate_limited: {"rate_limited": 0.2, "unavailable": 0.25, "transient": 0.15, "unknown": 0.4},
            Mode.degraded_executor: {
                "timeout": 0.25,
                "unavailable": 0.15,
                "transient": 0.1,
                "lost": 0.1,
                "unknown": 0.4,
            },
            Mode.bad_input: {
                "invalid_output": 0.2,
                "invalid_input": 0.1,
                "transient": 0.1,
                "permanent": 0.2,
                "unknown": 0.4,
            },
            Mode.resource: {"timeout": 0.3, "resource_exhausted": 0.1, "lost": 0.2, "unknown": 0.4},
            Mode.permanent: {"permanent": 0.25, "invalid_input": 0.15, "invalid_output": 0.2, "unknown": 0.4},
        }
    )


def _default_success() -> dict[str, dict[str, float]]:
    rows = {
        #                        now   backoff tuned reroute repair
        Mode.transient: (0.80, 0.85, 0.75, 0.80, 0.70),
        Mode.rate_limited: (0.10, 0.85, 0.10, 0.50, 0.05),
        Mode.degraded_executor: (0.15, 0.30, 0.20, 0.90, 0.15),
        Mode.bad_input: (0.03, 0.03, 0.15, 0.10, 0.85),
        Mode.resource: (0.10, 0.10, 0.85, 0.35, 0.05),
        Mode.permanent: (0.00, 0.00, 0.02, 0.05, 0.02),
    }
    return {str(m): {str(a): p for a, p in zip(RERUN_ACTIONS, row, strict=True)} for m, row in rows.items()}


DEFAULT_MIX: dict[str, float] = _by_name(
    {
        Mode.transient: 0.15,
        Mode.rate_limited: 0.15,
        Mode.degraded_executor: 0.2,
        Mode.bad_input: 0.15,
        Mode.resource: 0.2,
        Mode.permanent: 0.15,
    }
)
# The robustness report's shifted mix: more infrastructure trouble, fewer blips and bad inputs.
SHIFTED_MIX: dict[str, float] = _by_name(
    {
        Mode.transient: 0.1,
        Mode.rate_limited: 0.25,
        Mode.degraded_executor: 0.3,
        Mode.bad_input: 0.1,
        Mode.resource: 0.15,
        Mode.permanent: 0.1,
    }
)


@dataclass(frozen=True)
class SimulatorParams:
    """Everything the simulator draws from. ``fit`` re-estimates ``mix`` and ``success`` from logs."""

    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    success: dict[str, dict[str, float]] = field(default_factory=_default_success)
    types: dict[str, TaskTypeProfile] = field(default_factory=_default_types)
    type_given_mode: dict[str, dict[str, float]] = field(default_factory=_default_type_given_mode)
    error_given_mode: dict[str, dict[str, float]] = field(default_factory=_default_errors)
    failure_rate: dict[str, tuple[float, float]] = field(
        default_factory=lambda: _by_name(
            {
                Mode.transient: (2.0, 14.0),
                Mode.rate_limited: (5.0, 6.0),
                Mode.degraded_executor: (9.0, 3.0),
                Mode.bad_input: (2.0, 12.0),
                Mode.resource: (2.0, 12.0),
                Mode.permanent: (2.0, 12.0),
            }
        )
    )
    upstream: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {str(m): (0.3, 0.25) if m == Mode.bad_input else (0.8, 0.12) for m in MODES}
    )
    duration: dict[str, tuple[float, float]] = field(
        default_factory=lambda: _by_name(
            {
                Mode.transient: (0.0, 0.4),
                Mode.rate_limited: (0.0, 0.05),
                Mode.degraded_executor: (0.2, 1.0),
                Mode.bad_input: (0.01, 0.3),
                Mode.resource: (0.5, 1.0),
                Mode.permanent: (0.0, 0.2),
            }
        )
    )
    p_no_upstream: float = 0.2
    progress: tuple[float, float] = (0.0, 1.0)  # the workflow's finished share ~ Uniform(progress)
    # Budgets: the task's retry limit, and the workflow's surgery and inserted-task limits of
    # which earlier failures in the same workflow have already used all but ``*_left``.
    max_retries_choices: tuple[int, ...] = (1, 2)
    max_surgeries_choices: tuple[int, ...] = (4, 6, 10)
    surgeries_left_choices: tuple[int, ...] = (1, 2, 3)
    max_inserted_choices: tuple[int, ...] = (2, 5)
    inserted_left_choices: tuple[int, ...] = (0, 1, 1)
    time_budget_choices: tuple[float | None, ...] = (None, None, 150.0, 600.0)
    # The share of that time budget already spent (by the workflow's earlier tasks and
    # corrections) when the task first fails; the controller counts the budget from the start.
    time_used_before_choices: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    costs: CostModel = field(default_factory=CostModel)
    reward: RewardWeights = field(default_factory=RewardWeights)

    def __post_init__(self) -> None:
        if set(self.mix) != set(map(str, MODES)):
            raise ValueError(f"mix needs exactly the modes {[str(m) for m in MODES]}")
        if sum(self.mix.values()) <= 0:
            raise ValueError("mix must have a positive sum")

    @property
    def max_steps(self) -> int:
        """An episode makes at most this many decisions (each non-terminal one uses a surgery)."""
        return max(self.surgeries_left_choices) + 1

    def with_mix(self, mix: dict[str, float]) -> SimulatorParams:
        return replace(self, mix=_norm({str(m): float(mix.get(str(m), 0.0)) for m in MODES}))

    def holdout(self, mode: str) -> SimulatorParams:
        """The same world with ``mode`` never occurring: train here, evaluate on the full mix."""
        if mode not in self.mix:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(self.mix)}")
        return self.with_mix({**self.mix, mode: 0.0})

    def shifted(self) -> SimulatorParams:
        return self.with_mix(SHIFTED_MIX)

    def observable_error_classes(self) -> frozenset[str]:
        """Error classes that can occur under this mix (what a policy trained here has seen)."""
        return frozenset(c for m, w in self.mix.items() if w > 0 for c, p in self.error_given_mode[m].items() if p > 0)

    def fit(self, records: list[dict[str, Any]], strength: float = 30.0) -> SimulatorParams:
        """Re-estimate ``mix`` and ``success`` from logged decisions, shrunk toward these params."""
        from trainer.fit import fit

        return fit(records, prior=self, strength=strength)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulatorParams:
        data = dict(data)
        data["types"] = {k: TaskTypeProfile(**v) for k, v in data.get("types", {}).items()} or _default_types()
        data["costs"] = CostModel(**data.get("costs", {}))
        data["reward"] = RewardWeights(**data.get("reward", {}))
        for key in ("failure_rate", "upstream", "duration"):
            if key in data:
                data[key] = {k: tuple(v) for k, v in data[key].items()}
        for key in (
            "progress",
            "max_retries_choices",
            "max_surgeries_choices",
            "surgeries_left_choices",
            "max_inserted_choices",
            "inserted_left_choices",
            "time_budget_choices",
            "time_used_before_choices",
        ):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
