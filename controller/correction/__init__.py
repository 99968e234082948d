"""Correction Mode's decision side: actions, failure context, policies. Pure; no I/O.

``rules`` needs nothing beyond this package. The learned policy needs torch, which is imported
only by :func:`load_learned_policy` (and :mod:`controller.correction.learned`), so a controller
without torch installed still runs ``rules`` and ``off`` workflows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controller.correction.actions import ACTIONS, N_ACTIONS, CorrectiveAction, limits_reached, mask
from controller.correction.features import (
    FEATURE_DIM,
    FEATURE_SCHEMA_VERSION,
    FailureContext,
    featurize,
)
from controller.correction.policy import Decision, Policy, RulesPolicy

if TYPE_CHECKING:
    from controller.correction.learned import LearnedPolicy

__all__ = [
    "ACTIONS",
    "FEATURE_DIM",
    "FEATURE_SCHEMA_VERSION",
    "N_ACTIONS",
    "CorrectiveAction",
    "Decision",
    "FailureContext",
    "Policy",
    "RulesPolicy",
    "featurize",
    "learned_available",
    "limits_reached",
    "load_learned_policy",
    "mask",
]


def learned_available() -> bool:
    """Whether torch is importable, i.e. whether ``learned`` and ``shadow`` modes can run."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def load_learned_policy(weights: bytes, version: str, **options: Any) -> LearnedPolicy:
    """A :class:`~controller.correction.learned.LearnedPolicy` from checkpoint bytes (imports torch)."""
    from controller.correction.learned import LearnedPolicy

    return LearnedPolicy(weights, version, **options)
