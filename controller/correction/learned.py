"""The learned correction policy: a small actor-critic network and its safe use in the controller.

This module imports torch, so the controller imports it only for ``learned``/``shadow`` mode
(``controller.correction.load_learned_policy``); ``rules`` and ``off`` run without torch.

The same :class:`ActorCritic` is trained by ``trainer.ppo``. A trained policy travels as bytes
(``torch.save`` of a checkpoint dict: weights plus the facts needed to use them safely), so it
can live in a Postgres ``bytea`` column.

:meth:`LearnedPolicy.decide` falls back to the rules — and says why in ``fallback_reason`` — when

- ``feature_schema``: the policy was trained on another feature schema version (its inputs
  would mean other things);
- ``unknown_error_class``: the error class never occurred in its training data (the network
  would extrapolate blindly);
- ``low_confidence``: its most likely valid action has probability below ``confidence_threshold``.

``fallback_reason`` starts with that keyword and a colon (for metrics), then the details.

The default threshold is 0.5: below it the policy itself puts more mass on "some other action"
than on its favourite, i.e. it has no majority opinion, and the reviewed rules are the safer
choice. A decision with a single valid action never falls back (there is nothing to choose).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributions import Categorical

from controller.correction.actions import ACTIONS, N_ACTIONS, mask
from controller.correction.features import (
    ERROR_CLASSES,
    FEATURE_DIM,
    FEATURE_SCHEMA_VERSION,
    FailureContext,
    featurize,
)
from controller.correction.policy import Decision, RulesPolicy

DEFAULT_CONFIDENCE_THRESHOLD = 0.5
# Masked logits get this value instead of -inf: exp() of it underflows to exactly 0 in float32,
# so masked actions have probability 0, while 0 * log(p) stays 0 (with -inf it would be NaN).
MASKED_LOGIT = -1e8


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights, constant bias: the initialisation PPO implementations rely on."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class ActorCritic(nn.Module):
    """Separate two-layer tanh MLPs for the policy logits and the state value."""

    def __init__(self, obs_dim: int = FEATURE_DIM, n_actions: int = N_ACTIONS, hidden: int = 64) -> None:
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        # A small last layer starts the policy near uniform over the valid actions.
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, n_actions), std=0.01),
        )

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def distribution(self, obs: torch.Tensor, valid: torch.Tensor) -> Categorical:
        """The action distribution with invalid actions (``valid`` False) at probability 0."""
        logits = self.actor(obs).masked_fill(~valid, MASKED_LOGIT)
        return Categorical(logits=logits, validate_args=False)  # inputs are ours; validation is slow

    def get_action_and_value(
        self, obs: torch.Tensor, valid: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or score the given) actions: action, log-probability, entropy, value."""
        dist = self.distribution(obs, valid)
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.value(obs)


def checkpoint_bytes(
    net: ActorCritic,
    known_error_classes: Iterable[str],
    feature_schema_version: int = FEATURE_SCHEMA_VERSION,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise a network with what is needed to use it safely."""
    first = net.actor[0]
    assert isinstance(first, nn.Linear)
    hidden = first.out_features
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "hidden": hidden,
        "feature_schema_version": int(feature_schema_version),
        "known_error_classes": sorted(set(known_error_classes)),
        "metadata": dict(metadata or {}),
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def load_checkpoint(data: bytes) -> dict[str, Any]:
    # weights_only: a checkpoint from the database must not be able to run code when loaded.
    loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        raise ValueError("not a Dagsmith policy checkpoint (no state_dict)")
    return loaded


class LearnedPolicy:
    """A trained :class:`ActorCritic` behind the safety checks described in the module docstring."""

    def __init__(
        self,
        weights: bytes | Mapping[str, Any],
        version: str,
        feature_schema_version: int | None = None,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
        known_error_classes: Iterable[str] | None = None,
        sample: bool = False,
        seed: int | None = None,
    ) -> None:
        checkpoint: Mapping[str, Any]
        if isinstance(weights, bytes | bytearray | memoryview):
            checkpoint = load_checkpoint(bytes(weights))
        elif "state_dict" in weights:
            checkpoint = weights
        else:
            checkpoint = {"state_dict": weights}
        self.version = version
        self.feature_schema_version = int(
            feature_schema_version
            if feature_schema_version is not None
            else checkpoint.get("feature_schema_version", FEATURE_SCHEMA_VERSION)
        )
        classes = known_error_classes if known_error_classes is not None else checkpoint.get("known_error_classes")
        self.known_error_classes = frozenset(classes if classes is not None else ERROR_CLASSES)
        self.confidence_threshold = confidence_threshold
        self.metadata = dict(checkpoint.get("metadata", {}))
        self.sample = sample
        self._generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self._rules = RulesPolicy()
        self.net: ActorCritic | None = None
        if self.feature_schema_version == FEATURE_SCHEMA_VERSION:
            # Weights for another schema may not even fit the input layer: never build them.
            state = checkpoint["state_dict"]
            hidden = int(checkpoint.get("hidden", state["actor.0.weight"].shape[0]))
            self.net = ActorCritic(FEATURE_DIM, N_ACTIONS, hidden)
            self.net.load_state_dict(state)
            self.net.eval()

    def to_bytes(self) -> bytes:
        if self.net is None:
            raise ValueError("this policy was loaded for another feature schema and has no network")
        return checkpoint_bytes(self.net, self.known_error_classes, self.feature_schema_version, self.metadata)

    def probabilities(self, ctx: FailureContext, valid: tuple[bool, ...] | None = None) -> tuple[float, ...]:
        """The network's masked action distribution (no fallback). For shadow mode and analysis."""
        if self.net is None:
            raise ValueError("this policy was loaded for another feature schema and has no network")
        valid = valid if valid is not None else mask(ctx)
        with torch.inference_mode():
            obs = torch.tensor([featurize(ctx)], dtype=torch.float32)
            probs = self.net.distribution(obs, torch.tensor([valid])).probs[0]
        return tuple(float(p) for p in probs)

    def fallback_reason(self, ctx: FailureContext) -> str | None:
        """Why the network must not decide this case before even running it, or None."""
        if self.feature_schema_version != FEATURE_SCHEMA_VERSION:
            return f"feature_schema: policy uses v{self.feature_schema_version}, controller v{FEATURE_SCHEMA_VERSION}"
        if ctx.error_class not in self.known_error_classes:
            return f"unknown_error_class: {ctx.error_class!r} was not in the policy's training data"
        return None

    def decide(self, ctx: FailureContext) -> Decision:
        reason = self.fallback_reason(ctx)
        if reason is not None:
            return self._rules.decide(ctx, fallback_reason=reason)
        valid = mask(ctx)
        probs = self.probabilities(ctx, valid)
        best = max(range(N_ACTIONS), key=probs.__getitem__)
        if sum(valid) > 1 and probs[best] < self.confidence_threshold:
            reason = f"low_confidence: p({ACTIONS[best]})={probs[best]:.2f} < {self.confidence_threshold}"
            return self._rules.decide(ctx, fallback_reason=reason)
        if self.sample:
            index = int(torch.multinomial(torch.tensor(probs), 1, generator=self._generator).item())
        else:
            index = best
        return Decision(ACTIONS[index], probs, probs[index], valid, self.version, None, sampled=self.sample)
