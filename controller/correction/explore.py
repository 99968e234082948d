"""Exploration: now and then the controller tries another recovery action than the policy chose.

Why: a deterministic policy (the rules, an argmax network) logs one action per situation, so the
logs say nothing about what the others would have done, and no off-policy estimate of a new
policy can be trusted where it differs (it silently scores the decisions it happens to agree
with). With probability ``epsilon`` the controller takes a valid *recovery* action (a retry of
some kind, a reroute, a repair) drawn uniformly, and logs the distribution it really acted from,
so every recovery action has a known, non-zero propensity.

It never explores into ``skip`` or ``abort``: giving up is not something to try at random, and an
off-policy estimate does not need it — what giving up is worth is known without data (the task
ends skipped or failed at once, at no further cost). Nor does it explore on a ``poison`` failure:
the task's message crashed every executor that took it, ``DAGSMITH_MAX_DELIVERIES`` times, and a
random re-run would crash as many again (the policy may still choose one; the rules never do).
"""

from __future__ import annotations

import random
from dataclasses import replace

from controller.correction.actions import ACTIONS, TERMINAL_ACTIONS, CorrectiveAction
from controller.correction.features import FailureContext
from controller.correction.policy import Decision
from dagsmith.errors import ErrorClass

NOT_EXPLORED: frozenset[str] = frozenset({ErrorClass.poison})


def share(ctx: FailureContext, epsilon: float) -> float:
    """The exploration share for this failure: ``epsilon``, or 0 where exploring is never done."""
    return 0.0 if ctx.error_class in NOT_EXPLORED else epsilon


def explorable(valid: tuple[bool, ...]) -> tuple[CorrectiveAction, ...]:
    """The recovery actions exploration may take in a situation with this validity mask."""
    return tuple(a for a in ACTIONS if valid[a.ordinal] and a not in TERMINAL_ACTIONS)


def behaviour(decision: Decision, epsilon: float) -> tuple[float, ...]:
    """The distribution the controller acted from: the policy's own (one-hot when it does not
    sample) mixed with ``epsilon`` spread evenly over the explorable actions."""
    own = [decision.probability_of(a) for a in ACTIONS]
    options = explorable(decision.mask)
    if epsilon <= 0 or not options:
        return tuple(own)
    each = epsilon / len(options)
    return tuple((1 - epsilon) * p + (each if a in options else 0.0) for a, p in zip(ACTIONS, own, strict=True))


def explore(decision: Decision, epsilon: float, rng: random.Random) -> Decision | None:
    """The decision taken instead of ``decision`` when this draw explores, else None.

    The explored action may be the one the policy chose (exploration is uniform over the
    explorable actions); it is then still logged as explored, with the mixed propensity."""
    options = explorable(decision.mask)
    if epsilon <= 0 or not options or rng.random() >= epsilon:
        return None
    action = rng.choice(options)
    return replace(decision, action=action, chosen_probability=decision.probabilities[action.ordinal], sampled=False)
