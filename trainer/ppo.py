"""Proximal Policy Optimization for the correction policy, in one readable module.

Follows CleanRL's ``ppo.py``: every hyperparameter is in :class:`PPOConfig` with its default; the
implementation details that make PPO work are written out, not hidden in a library:

- vectorised rollouts (``num_envs`` simulator episodes stepped together, auto-reset);
- generalised advantage estimation (GAE), per-minibatch advantage normalisation;
- the clipped surrogate objective, a clipped value loss, an entropy bonus;
- global gradient-norm clipping, Adam with linear learning-rate annealing;
- orthogonal initialisation (in :class:`controller.correction.learned.ActorCritic`, the very
  network the controller loads);
- invalid-action masking applied the same way everywhere: the rollout samples from the masked
  distribution, the buffer stores each step's mask, the update re-scores actions under the
  stored masks (so log-probabilities, ratios and entropy ignore invalid actions), and evaluation
  takes the argmax of the masked distribution.

Every update logs the same diagnostics: approximate KL, clip fraction, explained variance,
entropy, value and policy losses, mean return and success of episodes finished in the rollout.
Runs are seeded (torch, the simulator's episode stream) and reproducible on one thread.

``gamma`` defaults to 1: an episode is a handful of decisions and the benchmark scores the
undiscounted episode reward, so the objective is the benchmark's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn, optim

from controller.correction.actions import ACTIONS, N_ACTIONS, mask
from controller.correction.features import FEATURE_DIM, FEATURE_SCHEMA_VERSION, featurize
from controller.correction.learned import ActorCritic, checkpoint_bytes
from trainer.simulator import (
    STREAM_TRAIN,
    Episode,
    EpisodeResult,
    EpisodeState,
    Simulator,
    VecEnv,
    episode_keys,
)


@dataclass
class PPOConfig:
    seed: int = 0
    total_timesteps: int = 120_000  # decisions sampled from the simulator
    num_envs: int = 64  # episodes stepped in parallel
    num_steps: int = 16  # steps per env per rollout (batch = num_envs * num_steps)
    learning_rate: float = 2e-3
    anneal_lr: bool = True
    gamma: float = 1.0
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 8
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None  # stop an update's epochs early past this KL (None: never)
    hidden: int = 64
    torch_threads: int = 1  # small networks: one thread is fastest and keeps runs reproducible
    eval_every: int = 10  # updates between learning-curve evaluations
    eval_episodes: int = 500  # validation episodes per learning-curve point

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        return max(1, self.total_timesteps // self.batch_size)


@dataclass
class TrainResult:
    net: ActorCritic
    config: PPOConfig
    history: list[dict[str, float]]  # one row of diagnostics per update
    curve: list[tuple[int, float]]  # (global step, mean validation reward of the greedy policy)
    wall_seconds: float
    known_error_classes: frozenset[str] = field(default_factory=frozenset)

    def checkpoint(self, metadata: dict[str, Any] | None = None) -> bytes:
        meta = {"trainer": "ppo", "config": asdict(self.config), "wall_seconds": self.wall_seconds, **(metadata or {})}
        return checkpoint_bytes(self.net, self.known_error_classes, FEATURE_SCHEMA_VERSION, meta)


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def train(
    sim: Simulator,
    config: PPOConfig | None = None,
    valid_episodes: Sequence[Episode] = (),
    log: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train an :class:`ActorCritic` on ``sim``'s training stream for ``config.seed``."""
    cfg = config or PPOConfig()
    started = time.perf_counter()
    seed_everything(cfg.seed, cfg.torch_threads)
    env = VecEnv(sim, episode_keys(STREAM_TRAIN, cfg.seed), cfg.num_envs)
    agent = ActorCritic(FEATURE_DIM, N_ACTIONS, cfg.hidden)
    optimizer = optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)

    # Rollout buffer. Masks are stored so the update scores actions under the same validity.
    obs = torch.zeros((cfg.num_steps, cfg.num_envs, FEATURE_DIM))
    masks = torch.zeros((cfg.num_steps, cfg.num_envs, N_ACTIONS), dtype=torch.bool)
    actions = torch.zeros((cfg.num_steps, cfg.num_envs), dtype=torch.long)
    logprobs = torch.zeros((cfg.num_steps, cfg.num_envs))
    rewards = torch.zeros((cfg.num_steps, cfg.num_envs))
    dones = torch.zeros((cfg.num_steps, cfg.num_envs))
    values = torch.zeros((cfg.num_steps, cfg.num_envs))

    global_step = 0
    next_obs_np, next_mask_np = env.reset()
    next_obs, next_mask = torch.from_numpy(next_obs_np), torch.from_numpy(next_mask_np)
    next_done = torch.zeros(cfg.num_envs)
    history: list[dict[str, float]] = []
    curve: list[tuple[int, float]] = []
    if valid_episodes:  # the untrained policy: where the learning curve starts
        curve.append((0, float(np.mean([r.reward for r in greedy_results(agent, sim, valid_episodes)]))))

    for update in range(1, cfg.num_updates + 1):
        if cfg.anneal_lr:
            frac = 1.0 - (update - 1.0) / cfg.num_updates
            optimizer.param_groups[0]["lr"] = frac * cfg.learning_rate

        finished: list[EpisodeResult] = []
        for step in range(cfg.num_steps):
            global_step += cfg.num_envs
            obs[step], masks[step], dones[step] = next_obs, next_mask, next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs, next_mask)
            values[step], actions[step], logprobs[step] = value, action, logprob
            o, m, r, d, done_episodes = env.step(action.numpy())
            finished += done_episodes
            rewards[step] = torch.from_numpy(r)
            next_obs, next_mask, next_done = torch.from_numpy(o), torch.from_numpy(m), torch.from_numpy(d)

        # GAE: dones[t] marks obs[t] as the first observation of a new episode.
        with torch.no_grad():
            next_value = agent.value(next_obs)
            advantages = torch.zeros_like(rewards)
            lastgaelam = torch.zeros(cfg.num_envs)
            for t in reversed(range(cfg.num_steps)):
                if t == cfg.num_steps - 1:
                    nextnonterminal, nextvalues = 1.0 - next_done, next_value
                else:
                    nextnonterminal, nextvalues = 1.0 - dones[t + 1], values[t + 1]
                delta = rewards[t] + cfg.gamma * nextvalues * nextnonterminal - values[t]
                lastgaelam = delta + cfg.gamma * cfg.gae_lambda * nextnonterminal * lastgaelam
                advantages[t] = lastgaelam
            returns = advantages + values

        b_obs = obs.reshape(-1, FEATURE_DIM)
        b_masks = masks.reshape(-1, N_ACTIONS)
        b_actions, b_logprobs = actions.reshape(-1), logprobs.reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)

        b_inds = np.arange(cfg.batch_size)
        clipfracs: list[float] = []
        for _epoch in range(cfg.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, cfg.batch_size, cfg.minibatch_size):
                mb = b_inds[start : start + cfg.minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_masks[mb], b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()  # the low-variance estimator
                    clipfracs.append(((ratio - 1.0).abs() > cfg.clip_coef).float().mean().item())

                mb_adv = b_advantages[mb]
                if cfg.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(
                    -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
                ).mean()

                if cfg.clip_vloss:
                    v_unclipped = (newvalue - b_returns[mb]) ** 2
                    v_clipped = b_values[mb] + torch.clamp(newvalue - b_values[mb], -cfg.clip_coef, cfg.clip_coef)
                    v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - b_returns[mb]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - cfg.ent_coef * entropy_loss + v_loss * cfg.vf_coef
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                optimizer.step()
            if cfg.target_kl is not None and approx_kl.item() > cfg.target_kl:
                break

        y_pred, y_true = b_values.numpy(), b_returns.numpy()
        var_y = np.var(y_true)
        explained_var = float("nan") if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
        row = {
            "update": float(update),
            "global_step": float(global_step),
            "learning_rate": float(optimizer.param_groups[0]["lr"]),
            "value_loss": v_loss.item(),
            "policy_loss": pg_loss.item(),
            "entropy": entropy_loss.item(),
            "old_approx_kl": old_approx_kl.item(),
            "approx_kl": approx_kl.item(),
            "clipfrac": float(np.mean(clipfracs)),
            "explained_variance": explained_var,
            "episodes": float(len(finished)),
            "mean_return": float(np.mean([e.reward for e in finished])) if finished else float("nan"),
            "success_rate": float(np.mean([e.success for e in finished])) if finished else float("nan"),
            "seconds": time.perf_counter() - started,
        }
        if valid_episodes and (update % cfg.eval_every == 0 or update == cfg.num_updates):
            score = float(np.mean([r.reward for r in greedy_results(agent, sim, valid_episodes)]))
            curve.append((global_step, score))
            row["valid_reward"] = score
        history.append(row)
        if log is not None:
            log(row)

    agent.eval()
    known = sim.params.observable_error_classes()
    return TrainResult(agent, cfg, history, curve, time.perf_counter() - started, known)


def greedy_results(net: ActorCritic, sim: Simulator, episodes: Sequence[Episode]) -> list[EpisodeResult]:
    """Play ``episodes`` with the masked argmax of ``net``, all episodes in one batch per step.

    This is the raw network (no rules fallback), for learning curves; the benchmark evaluates the
    deployed :class:`~controller.correction.learned.LearnedPolicy` with its fallback.
    """
    states = [EpisodeState() for _ in episodes]
    taken: list[list[int]] = [[] for _ in episodes]
    live = list(range(len(episodes)))
    while live:
        contexts = [sim.context(episodes[i], states[i]) for i in live]
        with torch.no_grad():
            o = torch.tensor([featurize(c) for c in contexts], dtype=torch.float32)
            m = torch.tensor([mask(c) for c in contexts], dtype=torch.bool)
            chosen = net.distribution(o, m).probs.argmax(dim=-1).tolist()
        valid = m.tolist()
        for k, (i, a) in enumerate(zip(live, chosen, strict=True)):
            sim.step(episodes[i], states[i], ACTIONS[a], valid[k])
            taken[i].append(a)
        live = [i for i in live if not states[i].done]
    return [
        sim.result(ep, st, tuple(ACTIONS[a] for a in acts))
        for ep, st, acts in zip(episodes, states, taken, strict=True)
    ]
