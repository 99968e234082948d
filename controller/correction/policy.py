"""What a correction policy returns, and the policy interface the controller calls.

A policy only *decides*: ``decide(ctx) -> Decision``. The controller then performs the surgery
and logs the decision (with its full distribution, which later serves as the propensity for
off-policy evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from controller.correction.actions import ACTIONS, N_ACTIONS, CorrectiveAction, mask
from controller.correction.features import FailureContext
from controller.correction.rules import RULES_VERSION, rules_action


@dataclass(frozen=True)
class Decision:
    """One corrective decision.

    ``probabilities`` is the policy's full distribution (in ``ACTIONS`` order, zero where masked);
    ``chosen_probability`` is the entry of the chosen action. ``sampled`` says whether the action
    was drawn from that distribution; if not (rules, argmax), the action was taken with
    certainty, whatever the distribution says (see :meth:`probability_of`). ``policy_version``
    names who actually decided: when the learned policy defers to the rules, it is the rules'
    version and ``fallback_reason`` says why.
    """

    action: CorrectiveAction
    probabilities: tuple[float, ...]
    chosen_probability: float
    mask: tuple[bool, ...]
    policy_version: str
    fallback_reason: str | None = None
    sampled: bool = False

    def probability_of(self, action: CorrectiveAction | str) -> float:
        """How likely this decision was to take ``action``: the propensity an off-policy estimate
        divides by (for the logged action) and weighs with (for a policy being evaluated)."""
        if self.sampled:
            return self.probabilities[[str(a) for a in ACTIONS].index(str(action))]
        return 1.0 if str(action) == str(self.action) else 0.0

    def __post_init__(self) -> None:
        if len(self.probabilities) != N_ACTIONS or len(self.mask) != N_ACTIONS:
            raise ValueError(f"probabilities and mask need {N_ACTIONS} entries")
        if not self.mask[self.action.ordinal]:
            raise ValueError(f"{self.action} is masked out in this situation")

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "probabilities": list(self.probabilities),
            "chosen_probability": self.chosen_probability,
            "mask": list(self.mask),
            "policy_version": self.policy_version,
            "fallback_reason": self.fallback_reason,
        }


@runtime_checkable
class Policy(Protocol):
    version: str

    def decide(self, ctx: FailureContext) -> Decision: ...


def one_hot(action: CorrectiveAction) -> tuple[float, ...]:
    return tuple(1.0 if a is action else 0.0 for a in ACTIONS)


class RulesPolicy:
    """The hand-written table of :mod:`controller.correction.rules` as a :class:`Policy`."""

    version = RULES_VERSION

    def decide(self, ctx: FailureContext, fallback_reason: str | None = None) -> Decision:
        valid = mask(ctx)
        action = rules_action(ctx, valid)
        return Decision(action, one_hot(action), 1.0, valid, self.version, fallback_reason)
