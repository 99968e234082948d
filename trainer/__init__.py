"""The correction policy's trainer: a failure-injection simulator, PPO, baselines, the benchmark.

Modules, each one concept: :mod:`trainer.params` (latent failure modes, costs, reward),
:mod:`trainer.simulator` (episodes, vectorised environment), :mod:`trainer.fit` (fit the
simulator to logged decisions), :mod:`trainer.ppo` (the PPO trainer), :mod:`trainer.baselines`
(heuristics, tuned table, oracle), :mod:`trainer.evaluate` (bootstrap intervals, paired
differences), :mod:`trainer.benchmark` and :mod:`trainer.report` (the benchmark and its report).
Needs torch (the ``learn`` extra) for PPO; the simulator and baselines need only numpy.
"""
