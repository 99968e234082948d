"""The failure-injection simulator: one episode = one failed task, corrected until it is fixed,
skipped or given up. See :mod:`trainer.params` for the latent modes, the costs and the reward.

All randomness of an episode is drawn up front, determined by the episode's key
``(stream, seed, index)`` alone (episodes are drawn in vectorised blocks of 1024, one ``numpy``
generator per block, seeded by ``(stream, seed, block)``): the latent mode, the task, the budgets, and for every
decision step the observed error class, the duration ratio and one uniform number that decides
the step's outcome (success iff ``u < success[mode][action]``). Every policy therefore faces the
same failures with the same luck: two policies that take the same action at the same step of the
same episode see the same outcome.

Streams keep data sets apart: ``TRAIN`` episodes (per training seed) for learning and tuning,
``VALID`` for learning curves, ``TEST`` for the held-out evaluation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from controller.correction.actions import ACTIONS, N_ACTIONS, TERMINAL_ACTIONS, CorrectiveAction, mask
from controller.correction.features import FEATURE_DIM, FailureContext, featurize
from trainer.params import MODES, Mode, SimulatorParams, TaskTypeProfile

RERUNS = tuple(a for a in ACTIONS if a not in TERMINAL_ACTIONS)  # actions that run the task again

STREAM_TRAIN, STREAM_VALID, STREAM_TEST = 0, 1, 2
A = CorrectiveAction
EpisodeKey = tuple[int, int, int]


@dataclass(frozen=True)
class Episode:
    key: EpisodeKey
    mode: str
    task_type: str
    optional: bool
    has_fallback: bool
    has_repair: bool
    has_tunable: bool
    max_retries: int
    max_surgeries: int
    surgeries_before: int  # used by earlier failures of the same workflow
    max_inserted: int
    inserted_before: int
    time_budget: float | None
    time_before: float  # seconds of the time budget the workflow had used when the task first failed
    progress: float
    failure_rate: float
    upstream_reward: float | None
    error_classes: tuple[str, ...]  # observed at decision step k
    duration_ratios: tuple[float, ...]
    outcome_draws: tuple[float, ...]  # step k's action succeeds iff draw < its success probability


@dataclass
class EpisodeState:
    step: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * N_ACTIONS)  # actions taken, per action
    task_seconds: float = 0.0
    latency: float = 0.0
    inserted: int = 0
    total_reward: float = 0.0
    outcome: str | None = None  # fixed | skipped | failed, once done

    @property
    def done(self) -> bool:
        return self.outcome is not None


@dataclass(frozen=True)
class EpisodeResult:
    key: EpisodeKey
    mode: str
    reward: float
    outcome: str
    task_seconds: float
    latency: float
    inserted: int
    actions: tuple[CorrectiveAction, ...]

    @property
    def success(self) -> bool:
        return self.outcome == "fixed"

    @property
    def skipped(self) -> bool:
        return self.outcome == "skipped"


Chooser = Callable[[Episode, FailureContext], CorrectiveAction]


def _inverse_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index of the category each uniform ``u`` falls into, for (broadcast) cumulative weights."""
    total = cdf[..., -1:]
    index = (u[..., None] * total >= cdf).sum(axis=-1)
    return np.minimum(index, cdf.shape[-1] - 1)


BLOCK = 1024  # episodes drawn together from one generator


class Simulator:
    """Draws episodes from :class:`SimulatorParams` and plays actions on them."""

    def __init__(self, params: SimulatorParams | None = None) -> None:
        self.params = p = params or SimulatorParams()
        self._modes = [str(m) for m in MODES]
        self._mode_cdf = np.cumsum([p.mix[m] for m in self._modes]) / sum(p.mix.values())
        self._type_names = list(p.types)
        self._type_cdf = np.array(
            [np.cumsum([p.type_given_mode[m].get(t, 0.0) for t in self._type_names]) for m in self._modes]
        )
        self._class_names = sorted({c for m in self._modes for c in p.error_given_mode[m]})
        self._class_cdf = np.array(
            [np.cumsum([p.error_given_mode[m].get(c, 0.0) for c in self._class_names]) for m in self._modes]
        )
        self._blocks: dict[tuple[int, int, int], dict[str, np.ndarray]] = {}

    def _block(self, stream: int, seed: int, block: int) -> dict[str, np.ndarray]:
        """Draws for episodes ``block * BLOCK ...`` of ``(stream, seed)``, vectorised.

        An episode's draws depend only on its key, never on which other episodes were drawn.
        """
        key = (stream, seed, block)
        cached = self._blocks.get(key)
        if cached is not None:
            return cached
        if len(self._blocks) > 64:  # keep memory bounded on endless training streams
            self._blocks.clear()
        p, n, steps = self.params, BLOCK, self.params.max_steps
        rng = np.random.default_rng([stream, seed, block])
        u = rng.random((n, 11))
        mode = _inverse_cdf(self._mode_cdf[None, :], u[:, 0])
        task_type = _inverse_cdf(self._type_cdf[mode], u[:, 1])
        classes = _inverse_cdf(self._class_cdf[mode][:, None, :], rng.random((n, steps)))
        beta = np.array([p.failure_rate[m] for m in self._modes])[mode]
        normal = np.array([p.upstream[m] for m in self._modes])[mode]
        bounds = np.array([p.duration[m] for m in self._modes])[mode]
        ratios = bounds[:, :1] + (bounds[:, 1:] - bounds[:, :1]) * rng.random((n, steps))
        drawn = {
            "u": u,
            "mode": mode,
            "task_type": task_type,
            "classes": classes,
            "ratios": ratios,
            "failure_rate": rng.beta(beta[:, 0], beta[:, 1]),
            "upstream": np.clip(rng.normal(normal[:, 0], normal[:, 1]), -1.0, 1.0),
            "no_upstream": rng.random(n) < p.p_no_upstream,
            "outcome": rng.random((n, steps)),
            # Drawn last so that adding it left every earlier draw (and seeded result) as it was.
            "time_before": rng.random(n),
        }
        self._blocks[key] = drawn
        return drawn

    def draw(self, key: EpisodeKey) -> Episode:
        p = self.params
        stream, seed, index = key
        b = self._block(stream, seed, index // BLOCK)
        i = index % BLOCK
        u = b["u"][i].tolist()
        task_type = self._type_names[int(b["task_type"][i])]
        profile = p.types[task_type]
        classes = tuple(self._class_names[c] for c in b["classes"][i].tolist())
        max_surgeries = p.max_surgeries_choices[int(u[5] * len(p.max_surgeries_choices))]
        max_inserted = p.max_inserted_choices[int(u[6] * len(p.max_inserted_choices))]
        time_budget = p.time_budget_choices[int(u[7] * len(p.time_budget_choices))]
        used = p.time_used_before_choices[int(float(b["time_before"][i]) * len(p.time_used_before_choices))]
        return Episode(
            key=key,
            mode=self._modes[int(b["mode"][i])],
            task_type=task_type,
            optional=u[2] < profile.p_optional,
            has_fallback=u[3] < profile.p_fallback,
            has_repair=profile.has_repair,
            has_tunable=profile.has_tunable,
            max_retries=p.max_retries_choices[int(u[4] * len(p.max_retries_choices))],
            max_surgeries=max_surgeries,
            surgeries_before=max_surgeries - p.surgeries_left_choices[int(u[9] * len(p.surgeries_left_choices))],
            max_inserted=max_inserted,
            inserted_before=max_inserted - p.inserted_left_choices[int(u[10] * len(p.inserted_left_choices))],
            time_budget=time_budget,
            time_before=0.0 if time_budget is None else used * time_budget,
            progress=p.progress[0] + (p.progress[1] - p.progress[0]) * u[8],
            failure_rate=float(b["failure_rate"][i]),
            upstream_reward=None if b["no_upstream"][i] else float(b["upstream"][i]),
            error_classes=classes,
            # A timeout used the whole timeout by definition; other failures stop early.
            duration_ratios=tuple(
                1.0 if c == "timeout" else r for c, r in zip(classes, b["ratios"][i].tolist(), strict=True)
            ),
            outcome_draws=tuple(b["outcome"][i].tolist()),
        )

    def episodes(self, stream: int, seed: int, n: int, start: int = 0) -> list[Episode]:
        return [self.draw((stream, seed, i)) for i in range(start, start + n)]

    def context(self, ep: Episode, st: EpisodeState) -> FailureContext:
        c = st.counts
        cls = ep.error_classes[st.step]
        return FailureContext(
            error_class=cls,
            task_type=ep.task_type,
            attempt=st.step + 1,  # every non-terminal action re-ran the task once
            # Every re-run counts against the retry limit, reroutes and repairs too: the
            # controller counts them so (controller.revisions), and the mask reads this.
            retries_used=sum(c[a.ordinal] for a in RERUNS),
            max_retries=ep.max_retries,
            surgeries_used=ep.surgeries_before + st.step,
            max_surgeries=ep.max_surgeries,
            inserted_used=ep.inserted_before + st.inserted,
            max_inserted=ep.max_inserted,
            reward=-0.75 if cls == "invalid_output" else -1.0,  # the evaluator's v1 reward
            upstream_reward=ep.upstream_reward,
            duration_ratio=ep.duration_ratios[st.step],
            executor_failure_rate=ep.failure_rate,
            has_fallback=ep.has_fallback and c[A.reroute.ordinal] == 0,  # one fallback per task
            has_repair=ep.has_repair,
            has_tunable=ep.has_tunable,
            optional=ep.optional,
            progress=ep.progress,
            # As the controller does, counted from the workflow's start, not the first failure.
            time_budget_used=None if ep.time_budget is None else (ep.time_before + st.latency) / ep.time_budget,
            tried=tuple(c),
        )

    def cost(self, task_type: str, action: CorrectiveAction, backoffs_before: int) -> tuple[float, float, int]:
        """(task-seconds, latency seconds, inserted tasks) of one action; deterministic."""
        return action_cost(self.params, self.params.types[task_type], action, backoffs_before)

    def step(
        self, ep: Episode, st: EpisodeState, action: CorrectiveAction, valid: Sequence[bool] | None = None
    ) -> float:
        """Apply ``action`` at the current step; returns the step's reward and updates ``st``.

        ``valid`` is the current mask when the caller already has it (saves rebuilding the context).
        """
        if st.done:
            raise RuntimeError("episode is over")
        if not (valid if valid is not None else mask(self.context(ep, st)))[action.ordinal]:
            raise ValueError(f"{action} is not valid at step {st.step} of episode {ep.key}")
        w = self.params.reward
        if action in TERMINAL_ACTIONS:
            st.outcome = "skipped" if action is A.skip else "failed"
            reward = w.skipped if action is A.skip else w.failed
        else:
            seconds, latency, inserted = self.cost(ep.task_type, action, st.counts[A.retry_backoff.ordinal])
            st.task_seconds += seconds
            st.latency += latency
            st.inserted += inserted
            reward = -(w.per_task_second * seconds + w.per_latency_second * latency + w.per_inserted_task * inserted)
            if ep.outcome_draws[st.step] < self.params.success[ep.mode][str(action)]:
                st.outcome = "fixed"
                reward += w.fixed
            else:
                reward -= w.failed_attempt
        st.counts[action.ordinal] += 1
        st.step += 1
        st.total_reward += reward
        return reward

    def play(self, ep: Episode, choose: Chooser) -> EpisodeResult:
        st = EpisodeState()
        actions = []
        while not st.done:
            ctx = self.context(ep, st)
            action = choose(ep, ctx)
            actions.append(action)
            self.step(ep, st, action, mask(ctx))
        return self.result(ep, st, tuple(actions))

    def result(self, ep: Episode, st: EpisodeState, actions: tuple[CorrectiveAction, ...] = ()) -> EpisodeResult:
        assert st.outcome is not None
        return EpisodeResult(
            ep.key, ep.mode, st.total_reward, st.outcome, st.task_seconds, st.latency, st.inserted, actions
        )


def action_cost(
    params: SimulatorParams, profile: TaskTypeProfile, action: CorrectiveAction, backoffs_before: int
) -> tuple[float, float, int]:
    c, s = params.costs, profile.seconds
    if action is A.retry_now:
        return s, s, 0
    if action is A.retry_backoff:
        return s, s + c.backoff_initial * c.backoff_factor**backoffs_before, 0
    if action is A.retry_tuned:
        return c.tuned_factor * s, c.tuned_factor * s, 0
    if action is A.reroute:
        return c.reroute_factor * s, c.reroute_factor * s + c.reroute_latency, 0
    if action is A.insert_repair:
        total = s + c.repair_factor * s + c.repair_seconds
        return total, total, 1
    return 0.0, 0.0, 0


class VecEnv:
    """``num_envs`` episodes stepped together for PPO rollouts; a finished one is replaced at once.

    Observations are feature vectors (schema of :mod:`controller.correction.features`) and masks
    are the action masks of the same contexts, so training sees exactly what the controller sees.
    """

    def __init__(self, sim: Simulator, keys: Iterator[EpisodeKey], num_envs: int) -> None:
        self.sim, self._keys, self.num_envs = sim, keys, num_envs
        self._episodes: list[Episode] = []
        self._states: list[EpisodeState] = []
        self._masks: list[tuple[bool, ...]] = []

    def _observe(self, i: int) -> tuple[list[float], tuple[bool, ...]]:
        ctx = self.sim.context(self._episodes[i], self._states[i])
        self._masks[i] = mask(ctx)
        return featurize(ctx), self._masks[i]

    def reset(self) -> tuple[np.ndarray, np.ndarray]:
        self._episodes = [self.sim.draw(next(self._keys)) for _ in range(self.num_envs)]
        self._states = [EpisodeState() for _ in range(self.num_envs)]
        self._masks = [() for _ in range(self.num_envs)]
        obs, masks = zip(*(self._observe(i) for i in range(self.num_envs)), strict=True)
        return np.asarray(obs, dtype=np.float32), np.asarray(masks, dtype=bool)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[EpisodeResult]]:
        obs = np.empty((self.num_envs, FEATURE_DIM), dtype=np.float32)
        masks = np.empty((self.num_envs, N_ACTIONS), dtype=bool)
        rewards = np.empty(self.num_envs, dtype=np.float32)
        dones = np.zeros(self.num_envs, dtype=np.float32)
        finished: list[EpisodeResult] = []
        for i, a in enumerate(actions):
            ep, st = self._episodes[i], self._states[i]
            rewards[i] = self.sim.step(ep, st, ACTIONS[int(a)], self._masks[i])
            if st.done:
                dones[i] = 1.0
                finished.append(self.sim.result(ep, st))
                self._episodes[i] = self.sim.draw(next(self._keys))
                self._states[i] = EpisodeState()
            obs[i], masks[i] = self._observe(i)
        return obs, masks, rewards, dones, finished


def episode_keys(stream: int, seed: int) -> Iterator[EpisodeKey]:
    """An endless stream of episode keys: ``(stream, seed, 0)``, ``(stream, seed, 1)``, ..."""
    return ((stream, seed, i) for i in itertools.count())


__all__ = [
    "MODES",
    "STREAM_TEST",
    "STREAM_TRAIN",
    "STREAM_VALID",
    "Episode",
    "EpisodeResult",
    "EpisodeState",
    "Mode",
    "Simulator",
    "SimulatorParams",
    "VecEnv",
    "action_cost",
    "episode_keys",
]
