"""Baseline policies for the benchmark, as simulator choosers ``(episode, context) -> action``.

- ``always_retry``: retry at once while allowed, then skip if optional, else abort.
- ``exponential_backoff``: retry with backoff while allowed, then skip/abort. The 0 of the
  normalised score.
- ``rules``: the hand-written table of :mod:`controller.correction.rules`.
- ``tuned table``: an error class x attempt-bucket -> action table, chosen by coordinate search
  on training episodes to maximise mean reward (cells whose action is masked fall back to the
  rules). It is the best any policy keyed on the error class and attempt alone can do, up to
  the search's local optimum.
- ``oracle``: knows the latent mode and plays the optimal policy for it, computed exactly by
  dynamic programming over the action counts (costs are deterministic, outcomes independent
  draws with known probabilities, the next error class only matters through the mask). Every
  observation other policies see is, given the mode, independent of the outcomes, so the oracle's
  expected reward bounds every policy's from above. The 1 of the normalised score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from controller.correction.actions import ACTIONS, TERMINAL_ACTIONS, CorrectiveAction, is_plain_retryable, mask
from controller.correction.features import FailureContext, canonical_error_class
from controller.correction.rules import attempt_bucket, first_valid, rules_action
from trainer.simulator import Episode, EpisodeState, Simulator

A = CorrectiveAction
Cell = tuple[str, int]


def always_retry(ep: Episode, ctx: FailureContext) -> CorrectiveAction:
    return first_valid((A.retry_now,), mask(ctx))


def exponential_backoff(ep: Episode, ctx: FailureContext) -> CorrectiveAction:
    return first_valid((A.retry_backoff,), mask(ctx))


def rules(ep: Episode, ctx: FailureContext) -> CorrectiveAction:
    return rules_action(ctx, mask(ctx))


class TableChooser:
    """A lookup table (error class, attempt bucket) -> action, with the rules where it has no valid entry."""

    def __init__(self, table: dict[Cell, CorrectiveAction] | None = None) -> None:
        self.table: dict[Cell, CorrectiveAction] = dict(table or {})
        self.visited: set[Cell] = set()  # cells consulted, recorded for the search

    def __call__(self, ep: Episode, ctx: FailureContext) -> CorrectiveAction:
        valid = mask(ctx)
        cell = (canonical_error_class(ctx.error_class), attempt_bucket(ctx.attempt))
        self.visited.add(cell)
        action = self.table.get(cell)
        if action is not None and valid[action.ordinal]:
            return action
        return rules_action(ctx, valid)


def tune_table(sim: Simulator, episodes: Sequence[Episode], passes: int = 3) -> TableChooser:
    """Coordinate ascent over table cells on ``episodes`` (training episodes only).

    Changing a cell can only change episodes that consult it (their trajectory is identical up
    to the first consultation), so each candidate is scored on those episodes alone.
    """
    chooser = TableChooser()
    rewards: list[float] = []
    visits: list[set[Cell]] = []
    for ep in episodes:
        chooser.visited = set()
        rewards.append(sim.play(ep, chooser).reward)
        visits.append(chooser.visited)
    cells = sorted(set().union(*visits))
    for _ in range(passes):
        changed = False
        for cell in cells:
            touched = [i for i, v in enumerate(visits) if cell in v]
            if not touched:
                continue
            current = chooser.table.get(cell)
            best_action, best_total = current, sum(rewards[i] for i in touched)
            outcomes: dict[CorrectiveAction | None, list[tuple[float, set[Cell]]]] = {}
            for candidate in (None, *ACTIONS):
                if candidate == current:
                    continue
                trial = TableChooser({**chooser.table, cell: candidate} if candidate else _without(chooser.table, cell))
                played = []
                for i in touched:
                    trial.visited = set()
                    played.append((sim.play(episodes[i], trial).reward, trial.visited))
                total = sum(r for r, _ in played)
                outcomes[candidate] = played
                if total > best_total + 1e-9:
                    best_action, best_total = candidate, total
            if best_action != current:
                changed = True
                chooser.table = {**chooser.table, cell: best_action} if best_action else _without(chooser.table, cell)
                for i, (r, v) in zip(touched, outcomes[best_action], strict=True):
                    rewards[i], visits[i] = r, v
        if not changed:
            break
    chooser.visited = set()
    return chooser


def _without(table: dict[Cell, CorrectiveAction], cell: Cell) -> dict[Cell, CorrectiveAction]:
    return {k: v for k, v in table.items() if k != cell}


class Oracle:
    """The optimal policy for the episode's true latent mode (see the module docstring)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._values: dict[tuple[object, ...], float] = {}
        self._p_retryable = {
            m: sum(p for c, p in errors.items() if is_plain_retryable(c))
            for m, errors in sim.params.error_given_mode.items()
        }

    def __call__(self, ep: Episode, ctx: FailureContext) -> CorrectiveAction:
        q = self._q(ep, ctx.tried, is_plain_retryable(ctx.error_class))
        return max(q, key=q.__getitem__)

    def expected_reward(self, ep: Episode) -> float:
        """The oracle's expected episode reward before the first error class is seen."""
        return self._value(ep, (0,) * len(ACTIONS))

    def _context(self, ep: Episode, counts: tuple[int, ...], retryable: bool) -> FailureContext:
        """The context after ``counts`` actions (all failed), for the mask only."""
        st = EpisodeState(step=sum(counts), counts=list(counts))
        backoffs = 0
        for action, n in zip(ACTIONS, counts, strict=True):
            for _ in range(n):
                _, latency, inserted = self.sim.cost(ep.task_type, action, backoffs)
                backoffs += action is A.retry_backoff
                st.latency += latency
                st.inserted += inserted
        ctx = self.sim.context(ep, st)
        # Only retryability of the class matters to the mask; a representative class stands in.
        rep = "transient" if retryable else "permanent"
        return replace(ctx, error_class=rep)

    def _q(self, ep: Episode, counts: tuple[int, ...], retryable: bool) -> dict[CorrectiveAction, float]:
        w, p = self.sim.params.reward, self.sim.params.success[ep.mode]
        ctx = self._context(ep, counts, retryable)
        q: dict[CorrectiveAction, float] = {}
        for action, ok in zip(ACTIONS, mask(ctx), strict=True):
            if not ok:
                continue
            if action in TERMINAL_ACTIONS:
                q[action] = w.skipped if action is A.skip else w.failed
                continue
            seconds, latency, inserted = self.sim.cost(ep.task_type, action, counts[A.retry_backoff.ordinal])
            cost = w.per_task_second * seconds + w.per_latency_second * latency + w.per_inserted_task * inserted
            success = p[str(action)]
            after = tuple(n + (k == action.ordinal) for k, n in enumerate(counts))
            q[action] = -cost + success * w.fixed + (1 - success) * (self._value(ep, after) - w.failed_attempt)
        return q

    def _value(self, ep: Episode, counts: tuple[int, ...]) -> float:
        key = (
            ep.mode,
            ep.task_type,
            ep.optional,
            ep.has_fallback,
            ep.max_retries,
            ep.max_surgeries - ep.surgeries_before,
            ep.max_inserted - ep.inserted_before,
            ep.time_budget,
            ep.time_before,
            counts,
        )
        value = self._values.get(key)
        if value is None:
            pr = self._p_retryable[ep.mode]
            value = 0.0
            for retryable, weight in ((True, pr), (False, 1 - pr)):
                if weight > 0:
                    value += weight * max(self._q(ep, counts, retryable).values())
            self._values[key] = value
        return value
