"""Evaluate correction policies on held-out simulator episodes, with honest uncertainty.

Results are kept as a matrix ``rewards[seed, episode]``: one row per training seed of a trained
policy (a single row for policies that need no training) and one column per held-out episode,
the same episodes for every policy. Confidence intervals bootstrap both axes — training seeds and
episodes — so they include the run-to-run variance of training, not only the luck of the
episodes. Differences between two policies are *paired*: the same episode (and the same
training seed, for two trained policies) appears in both, so the interval of the difference is
much tighter than the two separate intervals suggest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from controller.correction.actions import CorrectiveAction
from controller.correction.features import FailureContext
from controller.correction.policy import Policy
from trainer.simulator import Chooser, Episode, EpisodeResult, Simulator

N_BOOTSTRAP = 2000


def bootstrap_ci(
    values: np.ndarray | Sequence[float], n_boot: int = N_BOOTSTRAP, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval.

    ``values`` is 1-D (episodes) or 2-D (training seeds x episodes); for 2-D, seeds and episodes
    are resampled independently (a two-way bootstrap).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    n_seeds, n_eps = v.shape
    rng = np.random.default_rng(seed)
    # Resampling as multinomial weights keeps it vectorised: mean = w_s . V . w_e / (S * E).
    w_eps = rng.multinomial(n_eps, np.full(n_eps, 1.0 / n_eps), size=n_boot).astype(np.float64)
    if n_seeds > 1:
        w_seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot).astype(np.float64)
    else:
        w_seeds = np.ones((n_boot, 1))
    means = np.einsum("bs,se,be->b", w_seeds, v, w_eps) / (n_seeds * n_eps)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(low), float(high)


def paired_difference_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOTSTRAP, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Bootstrap interval of mean(a - b) on the same episodes (rows broadcast if one has one row)."""
    a2, b2 = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a2.shape[1] != b2.shape[1]:
        raise ValueError("paired differences need the same episodes for both policies")
    return bootstrap_ci(a2 - b2, n_boot, alpha, seed)


def normalised(value: float, zero: float, one: float) -> float:
    """0 at ``zero`` (exponential backoff), 1 at ``one`` (the oracle)."""
    return (value - zero) / (one - zero) if one != zero else float("nan")


@dataclass
class Evaluation:
    """One policy's results on a set of held-out episodes (rows: training seeds)."""

    name: str
    results: list[list[EpisodeResult]]
    fallbacks: Counter[str] = field(default_factory=Counter)  # fallback reason kind -> decisions
    decisions: int = 0

    def matrix(self, attr: str = "reward") -> np.ndarray:
        return np.array([[float(getattr(r, attr)) for r in row] for row in self.results])

    @property
    def rewards(self) -> np.ndarray:
        return self.matrix("reward")

    def mean(self, attr: str) -> float:
        return float(self.matrix(attr).mean())

    @property
    def success_rate(self) -> float:
        return self.mean("success")

    @property
    def fallback_rate(self) -> float:
        return sum(self.fallbacks.values()) / self.decisions if self.decisions else 0.0

    def only(self, mode: str) -> Evaluation:
        """The same evaluation restricted to episodes of one latent mode."""
        rows = [[r for r in row if r.mode == mode] for row in self.results]
        return Evaluation(f"{self.name} [{mode}]", rows)


class PolicyChooser:
    """Adapts a controller :class:`Policy` to the simulator, counting its fallbacks."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.fallbacks: Counter[str] = Counter()
        self.decisions = 0

    def __call__(self, ep: Episode, ctx: FailureContext) -> CorrectiveAction:
        decision = self.policy.decide(ctx)
        self.decisions += 1
        if decision.fallback_reason:
            self.fallbacks[decision.fallback_reason.split(":")[0]] += 1
        return decision.action


def evaluate(
    sim: Simulator, episodes: Sequence[Episode], name: str, choosers: Sequence[Chooser | Policy]
) -> Evaluation:
    """Play every episode with each chooser (one per training seed, or just one)."""
    evaluation = Evaluation(name, [])
    for chooser in choosers:
        play: Chooser
        if isinstance(chooser, Policy):
            play = PolicyChooser(chooser)
        else:
            play = chooser
        evaluation.results.append([sim.play(ep, play) for ep in episodes])
        if isinstance(play, PolicyChooser):
            evaluation.fallbacks.update(play.fallbacks)
            evaluation.decisions += play.decisions
    return evaluation
