"""``dagsmith trainer``: train, evaluate and benchmark the learned correction policy.

Torch and the trainer are imported inside the commands, so the rest of the CLI starts without
them. Where the simulator's parameters come from is decided in one place, :func:`load_params`:
defaults, a params JSON file, or decision records to fit from (JSON lines). ``train --from-db``
fits to the decisions logged in Postgres, gates and registers the result
(:func:`trainer.loop.train_and_gate`); ``serve`` runs the same on a schedule.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TextIO

import typer

if TYPE_CHECKING:
    from trainer.params import SimulatorParams

app = typer.Typer(
    help="The learned correction policy (needs torch).",
    no_args_is_help=True,
)

ParamsOption = Annotated[
    Path | None, typer.Option("--params", help="Simulator params as JSON (e.g. a fitted set)", exists=True)
]
RecordsOption = Annotated[
    Path | None,
    typer.Option("--records", help="Decision records (JSON lines) to fit the simulator to", exists=True),
]


def _require_torch() -> None:
    from controller.correction import learned_available

    if not learned_available():
        typer.echo("error: the trainer needs torch: pip install 'dagsmith[learn]'", err=True)
        raise typer.Exit(2)


def bad_input(message: str) -> NoReturn:
    """A file given on the command line is not what it should be: one line, exit 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def load_params(params_file: Path | None, records_file: Path | None) -> SimulatorParams:
    """The simulator's parameters: defaults, or a file, then fitted to records when given."""
    from trainer.params import SimulatorParams

    params = read_params(params_file) if params_file else SimulatorParams()
    if records_file is not None:
        records = read_records(records_file)
        try:
            params = params.fit(records)
        except (KeyError, TypeError, ValueError) as exc:  # each record was checked: what is left is the set
            bad_input(f"--records {records_file}: {_reason(exc)}")
        typer.echo(f"fitted the simulator to {len(records)} decision records", err=True)
    return params


def read_params(path: Path) -> SimulatorParams:
    """A params JSON file (``simulator-params.json`` as ``train`` writes it, or part of one)."""
    from dataclasses import fields

    from trainer.params import SimulatorParams

    where = f"--params {path}"
    data = _read_json(path, where)
    if not isinstance(data, dict):
        bad_input(f"{where}: must be a JSON object of simulator parameters, not {_json_kind(data)}")
    known = [f.name for f in fields(SimulatorParams)]
    unknown = sorted(set(data) - set(known))
    if unknown:  # a misspelt key would otherwise be a TypeError about __init__
        bad_input(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (known: {', '.join(known)})"
        )
    try:
        return SimulatorParams.from_dict(data)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        bad_input(f"{where}: {_reason(exc)}")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Decision records, one JSON object a line; a bad one is named by its line in the file."""
    where = f"--records {path}"
    text = _read_text(path, where)
    records = []
    # split("\n"), not splitlines(): the line numbers must be the file's, and splitlines also
    # breaks at characters (\x0c, \u2028) an editor shows inside a line.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad_input(f"{where} line {number}: not JSON: {exc.msg} (column {exc.colno})")
        try:
            check_record(record)
        except (KeyError, TypeError, ValueError) as exc:
            bad_input(f"{where} line {number}: {_reason(exc)}")
        records.append(record)
    return records


def check_record(record: Any) -> None:
    """What fitting reads of a record, checked here so that an error can name its line."""
    from controller.correction.actions import CorrectiveAction
    from controller.correction.features import FailureContext

    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, not {_json_kind(record)}")
    missing = [key for key in ("features", "action") if key not in record]
    if missing:
        raise ValueError(f"the record has no {' or '.join(map(repr, missing))}")
    if not isinstance(record["features"], dict):
        raise ValueError(f"'features' is a JSON object, not {_json_kind(record['features'])}")
    try:
        FailureContext.from_dict(record["features"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"'features': {_reason(exc)}") from None
    try:
        CorrectiveAction(record["action"])
    except ValueError:
        actions = ", ".join(a.value for a in CorrectiveAction)
        raise ValueError(f"'action' {record['action']!r} is not one of {actions}") from None
    seconds = record.get("task_seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"'task_seconds' is a number, not {_json_kind(seconds)}")


def load_policies(paths: list[Path], threshold: float) -> list[tuple[str, Any]]:
    """Each --policy checkpoint, loaded (and so checked) before any costly work starts."""
    from controller.correction.learned import LearnedPolicy

    policies = []
    for path in paths:
        data = _read_bytes(path, f"--policy {path}")
        try:
            policy = LearnedPolicy(data, path.stem, confidence_threshold=threshold)
        except Exception as exc:  # torch.load fails in many ways on a file that is not a checkpoint
            # The first sentence: torch's go on to suggest loading with weights_only=False, which
            # would let the file run code.
            detail = (str(exc).splitlines() or [""])[0].split(". ")[0]
            bad_input(f"--policy {path} is not a policy checkpoint: {type(exc).__name__}: {detail}".rstrip(": "))
        policies.append((path.name, policy))
    return policies


def _read_text(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad_input(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        bad_input(f"{where}: cannot read it: {exc.strerror}")


def _read_bytes(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        bad_input(f"{where}: cannot read it: {exc.strerror}")


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(_read_text(path, where))
    except json.JSONDecodeError as exc:
        bad_input(f"{where}: not JSON: {exc}")


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _reason(exc: BaseException) -> str:
    """An exception as the first line of its message (a KeyError's is the bare key)."""
    text = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
    return (text.splitlines() or [type(exc).__name__])[0]


@app.command("train")
def train_cmd(
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Training seeds (0 .. N-1)")] = 5,
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory for policies and diagnostics (default: trainer-out)")
    ] = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", min=1, help="Decisions per seed")] = None,
    params_file: ParamsOption = None,
    records_file: RecordsOption = None,
    from_db: Annotated[
        bool,
        typer.Option("--from-db", help="Fit to the logged decisions in Postgres, gate, register (and activate)"),
    ] = False,
    activate: Annotated[
        bool, typer.Option("--activate/--no-activate", help="With --from-db: activate if the gate passes")
    ] = True,
) -> None:
    """Train PPO policies (one per seed).

    On the simulator, it writes policy-seed<N>.pt and diagnostics.

    With --from-db: fit the simulator to the decisions logged in Postgres, train, keep the best
    seed, run the gate (held-out simulator episodes and an off-policy estimate on real decisions),
    register the version, and activate it if it passed.
    """
    _require_torch()
    if from_db:
        from dagsmith.settings import get_settings
        from trainer.loop import train_and_gate

        # Options that do not apply are refused, not ignored: the records come from Postgres and
        # the version goes to the registry. --params gives the prior the fit starts from.
        for flag, given in (("--records", records_file), ("--out", out)):
            if given is not None:
                typer.echo(
                    f"error: --from-db does not take {flag} (it reads Postgres and registers the version)", err=True
                )
                raise typer.Exit(2)
        trained = train_and_gate(
            get_settings().database_url.get_secret_value(),
            seeds=seeds,
            timesteps=timesteps,
            activate=activate,
            prior=load_params(params_file, None) if params_file else None,
            log=lambda line: typer.echo(line, err=True),
        )
        state = "activated" if trained.activated else "registered (not active)"
        typer.echo(f"{trained.version}: {state} in {trained.wall_seconds:.0f}s — {trained.report.reason}")
        raise typer.Exit(0 if trained.report.passed or not activate else 1)
    from trainer.ppo import PPOConfig, train
    from trainer.simulator import STREAM_VALID, Simulator

    out = out or Path("trainer-out")
    sim = Simulator(load_params(params_file, records_file))
    valid = sim.episodes(STREAM_VALID, 0, 500)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulator-params.json").write_text(json.dumps(sim.params.to_dict(), indent=2))
    summary: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in range(seeds):
        config = PPOConfig(seed=seed) if timesteps is None else PPOConfig(seed=seed, total_timesteps=timesteps)
        with (out / f"diagnostics-seed{seed}.jsonl").open("w") as diagnostics:

            def log(row: dict[str, float], f: TextIO = diagnostics) -> None:
                f.write(json.dumps(row) + "\n")

            result = train(sim, config, valid, log=log)
        policy = out / f"policy-seed{seed}.pt"
        policy.write_bytes(result.checkpoint({"seed": seed}))
        score = result.curve[-1][1] if result.curve else float("nan")
        typer.echo(f"seed {seed}: {result.wall_seconds:.1f}s, validation reward {score:.3f} -> {policy}")
        summary.append({"seed": seed, "policy": policy.name, "wall_seconds": result.wall_seconds, "valid": score})
    wall = time.perf_counter() - started
    (out / "train-summary.json").write_text(json.dumps({"wall_seconds": wall, "runs": summary}, indent=2))
    typer.echo(f"trained {seeds} seeds in {wall:.1f}s")


@app.command("evaluate")
def evaluate_cmd(
    policy: Annotated[
        list[Path] | None, typer.Option("--policy", help="Policy checkpoint(s); repeat for several", exists=True)
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", min=10, help="Held-out episodes")] = 3000,
    shifted: Annotated[bool, typer.Option("--shifted", help="Evaluate on the shifted mix of failure modes")] = False,
    threshold: Annotated[float, typer.Option("--threshold", help="Confidence threshold of the fallback")] = 0.5,
    params_file: ParamsOption = None,
    records_file: RecordsOption = None,
) -> None:
    """Evaluate policies and the baselines.

    On held-out simulator episodes.
    """
    _require_torch()
    from rich.table import Table

    from dagsmith.cli.client_cmds import out
    from trainer.baselines import Oracle, always_retry, exponential_backoff, rules, tune_table
    from trainer.evaluate import bootstrap_ci, evaluate, normalised
    from trainer.simulator import STREAM_TEST, STREAM_TRAIN, Simulator

    # Every input is read and checked first: a bad file is said at once, not after the tuning.
    learned = load_policies(policy or [], threshold)
    params = load_params(params_file, records_file)
    sim = Simulator(params)
    test_sim = Simulator(params.shifted()) if shifted else sim
    test = test_sim.episodes(STREAM_TEST, 0, episodes)
    table = tune_table(sim, sim.episodes(STREAM_TRAIN, 0, 3000))
    candidates: list[tuple[str, Any]] = [
        ("always-retry", always_retry),
        ("exponential backoff", exponential_backoff),
        ("rules", rules),
        ("tuned table", table),
    ]
    candidates += learned
    candidates.append(("oracle", Oracle(test_sim)))
    results = {name: evaluate(test_sim, test, name, [chooser]) for name, chooser in candidates}
    zero, one = results["exponential backoff"].rewards.mean(), results["oracle"].rewards.mean()
    view = Table(title=f"{episodes} held-out episodes ({'shifted' if shifted else 'default'} mix)")
    for column in ("policy", "mean reward [95% CI]", "normalised", "success", "task-s", "fallback"):
        view.add_column(column)
    for name, e in results.items():
        mean, low, high = bootstrap_ci(e.rewards)
        fallback = f"{e.fallback_rate:.1%}" if e.decisions else "—"
        view.add_row(
            name,
            f"{mean:.3f} [{low:.3f}, {high:.3f}]",
            f"{normalised(mean, zero, one):.2f}",
            f"{e.success_rate:.1%}",
            f"{e.mean('task_seconds'):.1f}",
            fallback,
        )
    out.print(view)


@app.command("benchmark")
def benchmark_cmd(
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Training seeds")] = 5,
    episodes: Annotated[int, typer.Option("--episodes", min=10, help="Held-out episodes per scenario")] = 3000,
    timesteps: Annotated[int | None, typer.Option("--timesteps", min=1, help="Decisions per seed")] = None,
    holdout: Annotated[str, typer.Option("--holdout", help="Failure mode held out of training")] = "rate_limited",
    out: Annotated[Path, typer.Option("--out", help="Report directory")] = Path("project_logs/experiments"),
    params_file: ParamsOption = None,
    records_file: RecordsOption = None,
) -> None:
    """Benchmark PPO against the baselines.

    Train on several seeds, evaluate on held-out episodes, write the report and learning curves.
    """
    _require_torch()
    from trainer.benchmark import BenchmarkConfig, run_benchmark
    from trainer.params import MODES
    from trainer.ppo import PPOConfig
    from trainer.report import write_report

    if holdout not in {str(m) for m in MODES}:
        typer.echo(f"error: --holdout must be one of {', '.join(map(str, MODES))}", err=True)
        raise typer.Exit(2)
    ppo = PPOConfig() if timesteps is None else PPOConfig(total_timesteps=timesteps)
    config = BenchmarkConfig(seeds=seeds, test_episodes=episodes, holdout_mode=holdout, ppo=ppo)
    result = run_benchmark(config, load_params(params_file, records_file), log=lambda m: typer.echo(m, err=True))
    command = "dagsmith trainer " + " ".join(["benchmark", *sys.argv[sys.argv.index("benchmark") + 1 :]]).strip()
    md, png = write_report(result, out, command)
    for target in result.targets:
        typer.echo(f"{'met   ' if target.met else 'MISSED'} {target.name}: {target.value} (goal {target.goal})")
    typer.echo(f"wrote {md} and {png}")


@app.command("serve")
def serve_cmd(
    interval: Annotated[float | None, typer.Option("--interval", help="[DAGSMITH_TRAINER_INTERVAL]")] = None,
    min_new: Annotated[int | None, typer.Option("--min-new", help="[DAGSMITH_TRAINER_MIN_NEW]")] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="[DAGSMITH_TRAINER_SEEDS]")] = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", min=1, help="[DAGSMITH_TRAINER_TIMESTEPS]")] = None,
) -> None:
    """Run the trainer service.

    It retrains from new decisions on a schedule, runs the gate and activates what passes.
    """
    from dagsmith.cli.services import run_service
    from dagsmith.settings import get_settings
    from trainer.service import TrainerService

    _require_torch()
    s = get_settings()
    service = TrainerService(
        interval or s.trainer_interval,
        min_new or s.trainer_min_new,
        seeds or s.trainer_seeds,
        timesteps or s.trainer_timesteps,
    )
    run_service("trainer", lambda stop: service.run(stop))
