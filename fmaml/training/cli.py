"""The ``fmaml`` command line (also ``python cli.py``): click commands over the library."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from fmaml.algorithms import ALGORITHMS
from fmaml.engine.memory import size
from fmaml.errors import FmamlError, NonFiniteError
from fmaml.inner_optim import INNER_OPTIMIZERS
from fmaml.training.checkpoint import CheckpointError, find_checkpoint
from fmaml.training.config import PAPER_DEFAULTS, TrainConfig
from fmaml.training.distributed import RankFailure
from fmaml.training.presets import PRESETS

DEFAULTS_HELP = "\n".join(
    f"  {ds:<13} {'' if ways is None else f'{ways}-way':<7} "
    + ", ".join(f"{k}={v}" for k, v in values.items())
    for (ds, ways), values in PAPER_DEFAULTS.items()
)


DEBUG_ENV = "FMAML_DEBUG"
"""Set (to anything but ``""`` or ``0``) to show the traceback of every error, as ``--debug``."""


def friendly_errors(command):
    """Print fmaml's errors for the user (:class:`fmaml.errors.FmamlError`: bad settings,
    files or data, a diverged run, a full disk) as one message with exit status 1.

    Every other exception is a bug in fmaml (or in torch) and keeps its traceback. With
    ``fmaml --debug`` or ``$FMAML_DEBUG`` the user's errors keep theirs too.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FmamlError as error:
            if _debugging():
                raise
            raise click.ClickException(str(error)) from None

    return wrapper


def _debugging() -> bool:
    context = click.get_current_context(silent=True)
    flag = bool(context and context.find_root().params.get("debug"))
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--debug",
    is_flag=True,
    help=f"Show the traceback of every error, not only of fmaml's own bugs (also ${DEBUG_ENV}=1).",
)
def main(debug: bool) -> None:
    """fmaml: MAML-family meta-learning on torch.func."""


# --- options generated from TrainConfig's fields ------------------------------------------------

_CHOICES = {
    "algorithms": lambda: sorted(ALGORITHMS),
    "presets": lambda: sorted(PRESETS),
    "inner_optimizers": lambda: sorted(INNER_OPTIMIZERS),
}
"""Choice lists a field's metadata names by key (they live in modules the config can't import)."""

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def config_options(command):
    """Give ``command`` one option per :class:`TrainConfig` field, built from the field's
    metadata (:func:`fmaml.training.config.option`): its help, choices, on/off form and
    default. A new setting is one field; its option follows."""
    for spec in reversed(dataclasses.fields(TrainConfig)):
        if spec.metadata.get("cli", True):
            command = _field_option(spec)(command)
    return command


def _field_option(spec: dataclasses.Field):
    meta, name = spec.metadata, spec.name
    kind = _TYPES.get(str(spec.type).replace(" | None", ""))
    default = meta.get("cli_default", None if spec.default is dataclasses.MISSING else spec.default)
    kwargs: dict = {"help": meta.get("help", ""), "default": default}
    flag = meta.get("flag")
    if meta.get("pairs"):  # a dict of NAME=VALUE numbers, one option per pair
        return click.option(
            f"--{name.replace('_', '-')}",
            name,
            multiple=True,
            callback=lambda ctx, param, values: _hyper_values(values),
            metavar="NAME=VALUE",
            **kwargs,
        )
    if kind is bool:
        if spec.default is False:  # off unless given
            return click.option(flag or f"--{name.replace('_', '-')}", name, is_flag=True, **kwargs)
        switch = name.replace("_", "-")
        return click.option(flag or f"--{switch}/--no-{switch}", name, **kwargs)
    choices = meta.get("choices")
    if isinstance(choices, str):
        choices = _CHOICES[choices]()
    if choices is not None:
        kwargs["type"] = click.Choice(list(choices))
    elif meta.get("path"):
        kwargs["type"] = click.Path(file_okay=False)
    elif kind is not None:
        kwargs["type"] = kind
    if default is not None:
        kwargs["show_default"] = True
    return click.option(flag or f"--{name.replace('_', '-')}", name, **kwargs)


TORCHRUN_HELP = """
\b
Several processes (data-parallel; --meta-batch stays the total per step):
  torchrun --nproc_per_node=N cli.py train --out RUN ...
  torchrun --nproc_per_node=N cli.py train --resume RUN
Rank 0 logs and writes checkpoints; a restarted job (--max-restarts) resumes itself."""


@main.command(
    epilog="\b\nPer-dataset defaults (MAML paper, Finn et al. 2017):\n"
    + DEFAULTS_HELP
    + "\n"
    + TORCHRUN_HELP
)
@config_options
@click.option(
    "--download/--no-download",
    default=None,
    help="Download the data when --data-root holds none: Omniglot into it, the CIFAR-100 and CUB "
    "archives into fmaml's cache [only for the default folders: a --data-root you name is "
    "downloaded for only with --download].",
)
@click.option(
    "--checksum/--no-checksum",
    default=True,
    show_default=True,
    help="Check archives against their published md5; --no-checksum accepts a re-packed or "
    "modified copy.",
)
@click.option(
    "--chunk-size",
    default=None,
    help="Strategy: tasks vmapped together ('all', or a number; 1 = no vmap) [auto].",
)
@click.option("--workers", type=int, default=None, help="Strategy: CPU worker threads [auto].")
@click.option(
    "--recompute-steps/--no-recompute-steps",
    default=None,
    help="Strategy: recompute each inner step in the backward, for memory [auto: no].",
)
@click.option(
    "--compile",
    "compile_step",
    is_flag=True,
    help="Strategy: compile the meta-step with torch.compile (MLPs; ~2x after a 20-90 s compile).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder [a new folder under ./runs].",
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    default=None,
    help="Continue the run in this folder from its latest checkpoint.",
)
@friendly_errors
def train(
    out,
    resume,
    iterations,
    download,
    checksum,
    chunk_size,
    workers,
    recompute_steps,
    compile_step,
    **options,
) -> None:
    """Meta-train a model; write metrics.jsonl, latest.pt and best.pt to the run folder.

    The meta-batch runs with fmaml.auto_strategy's choice for the device and model (printed
    at the start); --chunk-size, --workers and --recompute-steps override it. They change
    speed and memory, not what is computed.

    Under torchrun every rank runs this command; the meta-batch is split across them.
    """
    from fmaml.training import distributed

    if options["preset"] is not None:
        options, iterations = _with_preset(options, iterations)
    options["strategy"] = _strategy_overrides(chunk_size, workers, recompute_steps)
    if compile_step:  # one vmap over all tasks, compiled
        options["strategy"] = {"chunk_size": None, "workers": 1, **options["strategy"]}
        options["strategy"]["compile"] = True
    if resume and options["strategy"]:
        raise click.UsageError(
            "--chunk-size, --workers, --recompute-steps and --compile can't change on "
            "--resume: the run continues with the strategy it was started with (saved in its "
            "config), so that it ends exactly as an uninterrupted run would. Drop them."
        )

    if distributed.launched_by_torchrun() and out is None and not resume:
        raise click.UsageError(
            "under torchrun, name the run folder with --out RUN_DIR (or --resume RUN_DIR): "
            "every rank and every restart must use the same folder."
        )
    lead = not distributed.launched_by_torchrun() or os.environ["RANK"] == "0"
    try:
        _train(out, resume, iterations, {"download": download, "verify": checksum}, lead, options)
    except (CheckpointError, NonFiniteError) as error:
        # Every rank meets these alike (rank 0 read the folder and sent what it found; the
        # NaN check is on the all-reduced loss): rank 0 says why. Other errors, such as data
        # missing on one machine, are printed by every rank that meets them.
        if not lead:
            raise SystemExit(1) from error
        raise


def _with_preset(options: dict, iterations: int | None) -> tuple[dict, int | None]:
    """The preset's settings, each replaced by the option given on the command line."""
    from click.core import ParameterSource

    context = click.get_current_context()
    preset = PRESETS[options["preset"]]
    given = {
        name: value
        for name, value in options.items()
        if context.get_parameter_source(name) is not ParameterSource.DEFAULT
    }
    settings = {**preset.settings, **given}
    if iterations is None:
        iterations = settings.pop("iterations", None)
    settings.pop("iterations", None)
    return settings, iterations


def _preset_line(config: TrainConfig) -> str:
    """What ``train`` says of a run's preset: its summary and the settings replaced."""
    preset = PRESETS[config.preset]
    replaced = [
        f"{name}={getattr(config, name)!r}"
        for name, value in preset.settings.items()
        if getattr(config, name) != value
    ]
    line = f"preset {config.preset}: {preset.summary}"
    return line + (f"; replaced by the options given: {', '.join(replaced)}" if replaced else "")


def _train(out, resume, iterations, extra: dict, lead: bool, options: dict) -> None:
    from fmaml.training import distributed
    from fmaml.training.config import resolve
    from fmaml.training.train import train as run_training

    if resume:
        out = Path(resume)
        config = None
    else:
        config = resolve(TrainConfig(**options, iterations=iterations, extra=extra))
        iterations = None
        if config.preset is not None and lead:
            click.echo(_preset_line(config))
        if out is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{config.dataset}-{config.algorithm}-{stamp}"
        out = Path(out)
    ranks = distributed.init_from_env()
    restarted = ranks is not None and distributed.restart_count() > 0
    if lead:
        click.echo(f"run folder: {out}", err=True)
        if ranks is not None:
            click.echo(
                f"ranks: {ranks.world_size} (backend {distributed.backend()})"
                + (f"; restart {distributed.restart_count()}" if restarted else ""),
                err=True,
            )
    interrupt = _Interrupt() if ranks is None else None
    with contextlib.ExitStack() as restore:  # the handlers found are put back, whatever happens
        if interrupt is not None:
            restore.callback(interrupt.restore)
        else:
            previous = signal.signal(signal.SIGTERM, _stop_rank)
            if previous is not None:  # None: not set from Python, nothing to put back
                restore.callback(signal.signal, signal.SIGTERM, previous)
        bar = _Progress(iterations)
        restore.callback(bar.close)  # first: the bar's last line before anything else
        state = run_training(
            config,
            out,
            resume=True if resume else "auto" if restarted else False,
            iterations=iterations,
            on_step=bar.update if lead else None,
            should_stop=interrupt,
        )
    distributed.shutdown()
    if not lead:
        return
    if interrupt is not None and interrupt.requested:
        click.echo(
            f"interrupted: stopped after iteration {state.iteration} and saved it in "
            f"{out / 'latest.pt'}; continue with `python cli.py train --resume {out}`.",
            err=True,
        )
        raise SystemExit(130)
    note = _best_step_note(state, bar.validation_per_step)
    if note:
        click.echo(note)
    click.echo(_done_line(state, out))
    if state.memory_plan is not None:
        measured = "not measured" if state.peak_growth is None else size(state.peak_growth)
        click.echo(f"memory: {state.memory_plan}; measured peak {measured} above the start")


def _best_step_note(state, last_validation: list[float] | None) -> str | None:
    """A line before ``done:`` when an inner step before the last scored better on the
    validation of the model to test (best.pt's, else the final one's), else ``None``."""
    config, name = state.config, state.problem.score_name
    kept = config.keep_best and state.best.get("iteration") is not None
    per_step = state.best.get("score_per_step") if kept else last_validation
    if not per_step:
        return None
    higher = state.problem.higher_is_better
    best = best_step(per_step, higher_is_better=higher)
    if best is None:
        return None

    def shown(score: float) -> str:
        return f"{100 * score:.2f} %" if name == "accuracy" else f"{score:.4f}"

    last = len(per_step) - 1
    which = f"best.pt (iteration {state.best['iteration']})" if kept else "the final model"
    return (
        f"note: on validation, {which} scored best after inner step {best}: {name} "
        f"{shown(per_step[best])}, {'above' if higher else 'below'} the "
        f"{shown(per_step[last])} after {last} steps that validation and test report "
        f"(the run's test setting, as the protocol asks; a model trained briefly often peaks "
        f"early). `test --inner-steps {best}` tests at that step."
    )


def _done_line(state, out: Path) -> str:
    """The last line of ``train``: what best.pt holds, plainly (also without validation)."""
    best, name = state.best, state.problem.score_name
    if not state.config.keep_best:
        chosen = (
            f"the final model latest.pt (iteration {state.iteration}) is the one to test; "
            "no best.pt is kept (--no-keep-best, the sinusoid default: its validation tasks "
            "are not held out, and the paper tests the final model)"
        )
    elif best.get("iteration") is None:
        chosen = f"no validation split, so best.pt is the final model (iteration {state.iteration})"
    else:
        chosen = (
            f"best validation {name} {best['score']:.4f} ± {best['ci95']:.4f} at iteration "
            f"{best['iteration']} (best.pt; latest.pt is iteration {state.iteration})"
        )
    return f"done: {state.iteration} iterations; {chosen}; checkpoints in {out}"


class _Interrupt:
    """Ctrl-C (SIGINT) while training: finish the current step, save it, stop. A second
    Ctrl-C stops at once (the last checkpoint written stays valid).

    It takes Ctrl-C over only from Python's own handler (``KeyboardInterrupt``), in the main
    thread: a handler someone else installed (a test runner, an application running the
    command in its process) keeps Ctrl-C. :meth:`restore` puts the handler found back.
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous = None
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        click.echo("\nstopping after this step (Ctrl-C again to stop now)", err=True)

    def __call__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _stop_rank(signum, frame) -> None:
    """torchrun sends SIGTERM to every rank when one fails: stop with a message, not a trace."""
    raise RankFailure(
        f"stopped by signal {signal.Signals(signum).name} (torchrun stops every rank when one "
        "fails; see its summary for which)"
    )


def _hyper_values(values: tuple[str, ...]) -> dict[str, float]:
    """``("beta=0.5", ...)`` as ``{"beta": 0.5}`` (``--inner-hyper``)."""
    parsed = {}
    for item in values:
        name, equals, value = item.partition("=")
        try:
            if not equals or not name.strip():
                raise ValueError
            parsed[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"expected NAME=VALUE with a number, e.g. beta=0.5; got {item!r}",
                param_hint="--inner-hyper",
            ) from None
    return parsed


def _strategy_overrides(chunk_size: str | None, workers: int | None, recompute) -> dict:
    """The fields of fmaml.Strategy the options set (``None``: left to auto_strategy)."""
    overrides: dict = {}
    if chunk_size is not None:
        if chunk_size == "all":
            overrides["chunk_size"] = None
        elif chunk_size.isdigit() and int(chunk_size) > 0:
            overrides["chunk_size"] = int(chunk_size)
        else:
            raise click.ClickException(
                f"--chunk-size must be 'all' or a positive number of tasks, got {chunk_size!r}."
            )
    if workers is not None:
        overrides["workers"] = workers
    if recompute is not None:
        overrides["checkpoint"] = recompute
    return overrides


LOG_EVERY_S = 15.0
"""Seconds between progress lines when stderr is not a terminal (a log file, a pipe)."""


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class _Progress:
    """Training progress from the loop's per-step callback, on stderr.

    On a terminal, a click progress bar. Otherwise (``train ... > log 2>&1``) plain lines
    naming the iteration, loss, score, rate and the last validation: at the first step, every
    :data:`LOG_EVERY_S` seconds, and at the last step.

    Args:
        total: the iteration the run goes to (``None``: the config's ``iterations``).
    """

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.bar = None
        self.lines = not _stderr_is_terminal()
        self.started = False
        self.status = ""
        self.start = time.perf_counter()
        self.first = 0
        self.last_line = (self.start, 0)  # (time, iteration) of the last line written
        self.validation = ""
        self.validation_per_step: list[float] | None = None  # the last validation's

    def update(self, state, metrics) -> None:
        now = time.perf_counter()
        total = self.total or state.config.iterations
        if not self.started:
            self.started = True
            if state.problem.data:
                click.echo(state.problem.data, err=True)
            click.echo(f"strategy: {state.strategy}", err=True)
            self.first = state.iteration - 1
            self.last_line = (self.start, self.first)
            if self.lines:
                click.echo(
                    f"meta-training to iteration {total}; a line every {LOG_EVERY_S:.0f} s",
                    err=True,
                )
            else:
                self.bar = click.progressbar(
                    length=total,
                    label="meta-training",
                    file=sys.stderr,
                    item_show_func=lambda _: self.status,
                    show_pos=True,
                )
                self.bar.__enter__()
                self.bar.update(self.first)
        name = state.problem.score_name
        if "validation" in metrics:
            self.validation_per_step = metrics.get("validation_per_step")
            self.validation = (
                f"; validation {name} {metrics['validation']:.4f} "
                f"± {metrics['validation_ci95']:.4f} (iteration {state.iteration})"
            )
        if self.bar is not None:
            done = state.iteration - self.first
            rate = done * state.config.meta_batch / (now - self.start)
            self.status = (
                f"loss {metrics['loss']:.3f} {name} {metrics[name]:.3f} {rate:.0f} tasks/s"
            )
            self.bar.update(1)
            return
        last_time, last_iteration = self.last_line
        it = state.iteration
        first = it - 1 == self.first
        if not first and it < total and now - last_time < LOG_EVERY_S:
            return
        line = f"iteration {it}/{total}: loss {metrics['loss']:.4f} {name} {metrics[name]:.4f}, "
        if first:  # no rate yet: the time so far is mostly start-up
            line += f"first step done {_duration(now - self.start)} after start"
        else:
            rate = (it - last_iteration) / max(now - last_time, 1e-9)
            line += (
                f"{rate:.1f} it/s ({rate * state.config.meta_batch:.0f} tasks/s), "
                f"{_duration(now - self.start)} elapsed, {_duration((total - it) / rate)} left"
            )
        click.echo(line + self.validation, err=True)
        self.last_line = (now, it)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _duration(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"``, ``"2.1 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@main.command()
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(),
    help="A checkpoint file, or a run folder (its best.pt).",
)
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--episodes", type=int, default=600, show_default=True)
@click.option(
    "--inner-steps",
    type=int,
    default=None,
    help="Inner steps [sinusoid: 10, reporting 1/5/10; else the run's test setting].",
)
@click.option(
    "--ways",
    type=int,
    default=None,
    help="Classes per task [the run's]; other than trained, every head row starts at the "
    "mean of the trained rows.",
)
@click.option("--shots", type=int, default=None, help="[sinusoid: 5 and 10; else the run's]")
@click.option(
    "--query",
    type=int,
    default=None,
    help="Query per class [the run's: paper protocol K; common practice 15].",
)
@click.option(
    "--within-alphabet/--across-alphabets",
    "within_alphabet",
    default=None,
    help="Omniglot: all classes of a task from one alphabet (Lake et al.; alphabets with "
    "fewer characters than --ways are skipped), or from any [the run's].",
)
@click.option(
    "--inner-lr",
    type=float,
    default=None,
    help="Inner rate at test [the run's; runs with learned rates use theirs].",
)
@click.option("--seed", type=int, default=None, help="Episode seed [fixed: same tasks for all].")
@click.option("--device", default=None, help="[the run's device]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
@friendly_errors
def test(
    checkpoint,
    split,
    episodes,
    inner_steps,
    ways,
    shots,
    query,
    within_alphabet,
    inner_lr,
    seed,
    device,
    as_json,
) -> None:
    """Evaluate a trained model on fixed held-out episodes: mean and 95% interval.

    Prints the checkpoint and its iteration, then the score after every inner step.
    Under torchrun the episodes are split across the ranks (each reads the checkpoint) and
    rank 0 prints the result of the whole set.
    """
    from fmaml.training import distributed
    from fmaml.training.train import TEST_SEED, evaluate_state, restore_state

    ranks = distributed.init_from_env()
    path = find_checkpoint(checkpoint)
    if ranks is not None and device is not None and device.startswith("cuda"):
        device = "cuda"  # each rank's own GPU
    echo = click.echo if ranks is None or ranks.rank == 0 else _silent
    state = restore_state(path, device=device)
    seed = TEST_SEED if seed is None else seed
    if episodes < 1:
        raise click.BadParameter(f"must be at least 1, got {episodes}", param_hint="--episodes")
    config = state.config
    if config.dataset == "sinusoid" and (ways is not None or within_alphabet):
        raise click.UsageError(
            "--ways and --within-alphabet apply to classification; a sinusoid task has one "
            "output and no alphabets. Drop them."
        )
    echo(_checkpoint_line(path, state))
    if config.dataset == "sinusoid":
        report = _test_sinusoid(
            state, path, split, episodes, inner_steps, shots, inner_lr, seed, echo
        )
    else:
        result = evaluate_state(
            state,
            split=split,
            num_episodes=episodes,
            num_steps=inner_steps,
            shots=shots,
            query=query,
            ways=ways,
            within_alphabet=within_alphabet,
            inner_lr=inner_lr,
            seed=seed,
        )
        report = _test_classification(state, path, split, result, echo)
    if as_json:
        echo(json.dumps(report))
    distributed.shutdown()


def _checkpoint_line(path: Path, state) -> str:
    """``checkpoint RUN/best.pt: iteration 16000 of 70000 (best validation ...)``."""
    config, best = state.config, state.best
    which = f"iteration {state.iteration} of {config.iterations}"
    if path.name == "best.pt" and best.get("iteration") == state.iteration:
        which += (
            f", the best validation {state.problem.score_name} "
            f"({best['score']:.4f} on {config.val_episodes} episodes)"
        )
    elif state.iteration >= config.iterations:
        which += ", the final model"
    return (
        f"checkpoint {path}: {which}; trained {config.algorithm} "
        + ("" if config.dataset == "sinusoid" else f"{config.ways}-way ")
        + f"{config.shots}-shot, {config.inner_steps} inner step"
        + ("s" if config.inner_steps != 1 else "")
        + (
            f" at {config.inner_lr}"
            if state.rates is None
            else f", rates learned from {config.inner_lr}"
        )
        + _inner_optimizer_words(config)
        + (", bf16 mixed precision" if config.precision == "bf16" else "")
    )


def _inner_optimizer_words(config) -> str:
    """``, inner adam (beta1=0.5, betas learned)`` for ``_checkpoint_line`` ('' for sgd)."""
    if config.inner_optimizer == "sgd":
        return ""
    settings = [f"{k}={v}" for k, v in config.inner_hyper.items()]
    settings += ["betas learned"] if config.learn_inner_hyper else []
    return f", inner {config.inner_optimizer}" + (f" ({', '.join(settings)})" if settings else "")


def _test_sinusoid(state, path, split, episodes, inner_steps, shots, inner_lr, seed, echo) -> dict:
    """Test a sinusoid run at K=5 and K=10 (or ``shots``); print and return the report."""
    from fmaml.training.problems import SINUSOID_EVAL_QUERY
    from fmaml.training.train import evaluate_state

    steps = 10 if inner_steps is None else inner_steps
    report = {
        "dataset": "sinusoid",
        "checkpoint": str(path),
        "iteration": state.iteration,
        "episodes": episodes,
        "inner_steps": steps,
        "inner_lr": None,
        "query_points": SINUSOID_EVAL_QUERY,
        "metric": "mse",
        "seed": seed,
        "results": {},
    }
    for k in [shots] if shots else [5, 10]:
        result = evaluate_state(
            state,
            split=split,
            num_episodes=episodes,
            num_steps=steps,
            shots=k,
            query=k,
            inner_lr=inner_lr,
            seed=seed,
        )
        report["inner_lr"] = result["inner_lr"]
        report["results"][f"K={k}"] = {
            str(s["step"]): {"mse": s["mean"], "ci95": s["ci95"], "median": s["median"]}
            for s in result["steps"]
        }
    shown = [s for s in (1, 5, 10) if s <= steps] or [steps]
    for name, per_step in report["results"].items():
        cells = "  ".join(
            f"{s} step{'s' if s > 1 else ''}: {per_step[str(s)]['mse']:.3f} "
            f"± {per_step[str(s)]['ci95']:.3f} (median {per_step[str(s)]['median']:.3f})"
            for s in shown
        )
        rate = report["inner_lr"]
        rate = f"inner rate {rate}" if rate != "learned" else "learned inner rates"
        rate += _imaml_pull(state.config)
        echo(f"sinusoid {name}, MSE on {episodes} tasks ({rate})  {cells}")
        every = "  ".join(f"{s}: {cell['mse']:.3f}" for s, cell in per_step.items())
        echo(f"  {name} MSE after each inner step (0 = before adapting): {every}")
        best = best_step([cell["mse"] for cell in per_step.values()], higher_is_better=False)
        if best is not None:
            top = per_step[str(best)]
            echo(
                f"  note: {name} inner step {best} scored best, MSE {top['mse']:.3f} ± "
                f"{top['ci95']:.3f}, below the {per_step[str(steps)]['mse']:.3f} after {steps} "
                f"steps (the headline, as the protocol asks; a model trained briefly often "
                f"peaks early). --inner-steps {best} tests at that step."
            )
    return report


def _imaml_pull(config) -> str:
    """What the test's inner loop adds for an iMAML run: its proximal pull, as in training."""
    if config.algorithm != "imaml":
        return ""
    return f" plus iMAML's pull {config.imaml_lam}/2 ||adapted - params||^2"


def best_step(scores: list[float], *, higher_is_better: bool) -> int | None:
    """The inner step (index into ``scores``, one per step from 0) that scored strictly
    better than the last one, the best such; ``None`` when the last step is the best.

    Example:
        >>> best_step([0.2, 0.515, 0.3, 0.23], higher_is_better=True)
        1
        >>> best_step([3.0, 0.5, 0.4], higher_is_better=False) is None
        True
        >>> best_step([3.0, 0.5, float("nan")], higher_is_better=False)
        1
    """
    sign = 1.0 if higher_is_better else -1.0
    ranked = [-math.inf if math.isnan(score) else sign * score for score in scores]  # NaN: worst
    best = max(range(len(scores)), key=lambda step: (ranked[step], step))
    return None if ranked[best] <= ranked[-1] else best


def _test_classification(state, path, split, result, echo) -> dict:
    """Print and return the report of a classification test (``evaluate_state``'s result)."""
    config = state.config
    last = result["steps"][-1]
    protocol = result["protocol"]
    query_protocol = (
        "paper protocol: K per class"
        if result["query_per_class"] == result["shots"]
        else "common practice: 15 per class"
        if result["query_per_class"] == 15
        else "custom"
    )
    tasks = protocol.get("protocol", "random-classes")
    rate = result["inner_lr"] if result["inner_lr"] != "learned" else "learned rates"
    rate = f"{rate}{_imaml_pull(config)}"
    if tasks == "within-alphabet":
        used = ", ".join(f"{name} ({n})" for name, n in protocol["alphabets"].items())
        tasks += f" ({used} characters)"
    echo(
        f"{config.dataset} {result['ways']}-way {result['shots']}-shot, {tasks}, {split} split "
        f"({config.split or 'default'}, split seed {config.split_seed}): "
        f"accuracy {100 * last['mean']:.2f} ± {100 * last['ci95']:.2f} % after "
        + (
            f"{result['inner_steps']} inner steps at {rate} "
            if result["inner_steps"]
            else "0 inner steps (ProtoNet: the prototype head alone) "
        )
        + f"(95% CI = 1.96·std/√n over {result['episodes']} episodes; "
        f"{result['query_per_class']} query per class, {query_protocol})"
    )
    echo(
        "  accuracy after each inner step (0 = before adapting): "
        + "  ".join(
            f"{s['step']}: {100 * s['mean']:.2f} ± {100 * s['ci95']:.2f} %" for s in result["steps"]
        )
    )
    best = best_step([s["mean"] for s in result["steps"]], higher_is_better=True)
    if best is not None:
        top = result["steps"][best]
        echo(
            f"  note: inner step {best} scored best, {100 * top['mean']:.2f} ± "
            f"{100 * top['ci95']:.2f} %, above the {100 * last['mean']:.2f} % after "
            f"{last['step']} steps reported above (the step count tested, the run's test "
            f"setting unless --inner-steps; a model trained briefly often peaks early). "
            f"--inner-steps {best} tests at that step."
        )
    skipped = protocol.get("skipped_alphabets")
    if skipped:
        echo(
            f"  skipped {len(skipped)} {split} alphabet(s) with fewer than {result['ways']} "
            "characters: " + ", ".join(f"{name} ({n})" for name, n in skipped.items())
        )
    if result["ways"] != config.ways and ALGORITHMS[config.algorithm].head_init is not None:
        echo(
            f"  trained {config.ways}-way: the head starts from each task's {result['ways']} "
            "class prototypes"
        )
    elif result["ways"] != config.ways:
        echo(
            f"  trained {config.ways}-way: each of the {result['ways']} head rows starts at "
            f"the mean of the {config.ways} trained rows"
        )
    return {
        "dataset": config.dataset,
        "checkpoint": str(path),
        "iteration": result["iteration"],
        "split": split,
        "classes_split_by": config.split,
        "split_seed": config.split_seed,
        **protocol,
        "ways": result["ways"],
        "trained_ways": config.ways,
        "shots": result["shots"],
        "accuracy": 100 * last["mean"],
        "ci95": 100 * last["ci95"],
        "episodes": result["episodes"],
        "inner_steps": result["inner_steps"],
        "inner_lr": result["inner_lr"],
        "precision": config.precision,
        "query_per_class": result["query_per_class"],
        "seed": result["seed"],
        "accuracy_per_step": [100 * s["mean"] for s in result["steps"]],
        "best_step": last["step"] if best is None else best,
        "ci95_per_step": [100 * s["ci95"] for s in result["steps"]],
    }


def _silent(*args, **kwargs) -> None:
    """Ranks other than 0 print nothing."""


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--output", type=click.Path(dir_okay=False), default=None, help="PNG path [RUN_DIR/curves.png]."
)
@friendly_errors
def plot(run_dir, output) -> None:
    """Plot training and validation score against iteration to a PNG."""
    from fmaml.training.plot import plot_run

    path = plot_run(run_dir, output)
    click.echo(f"wrote {path}")


@main.command()
@click.option(
    "--settings",
    "names",
    multiple=True,
    help="Which settings to run [all]: sinusoid, omniglot, miniimagenet.",
)
@click.option(
    "--orders",
    multiple=True,
    type=click.Choice(["second", "first"]),
    help="Second- and/or first-order MAML [both].",
)
@click.option(
    "--impls",
    multiple=True,
    help="Implementations [fmaml, fmaml-vmap, loop]; also fmaml-checkpoint, learn2learn, "
    "higher (--compare adds these two).",
)
@click.option(
    "--compare", is_flag=True, help="Also run learn2learn and higher; print speed ratios."
)
@click.option(
    "--repeats", type=int, default=3, show_default=True, help="Timed meta-steps, at least."
)
@click.option(
    "--min-seconds",
    type=float,
    default=1.0,
    show_default=True,
    help="Time each for this long, at least.",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="torch intra-op threads [torch's default].")
@click.option(
    "--chunk-size",
    default=None,
    help="fmaml strategy: tasks vmapped together ('all', or a number; 1 = no vmap) [auto].",
)
@click.option(
    "--workers", type=int, default=None, help="fmaml strategy: CPU worker threads [auto]."
)
@click.option(
    "--checkpoint/--no-checkpoint",
    default=None,
    help="fmaml strategy: recompute each inner step in the backward [auto: no].",
)
@click.option(
    "--isolate/--no-isolate",
    default=None,
    help="Each measurement in a fresh process, for its own peak RSS [on for CPU].",
)
@click.option(
    "--cudnn-benchmark", is_flag=True, help="Let cuDNN time its algorithms (all implementations)."
)
@click.option(
    "--fastest", is_flag=True, help="Rates from the fastest timed step (on a busy machine)."
)
@click.option(
    "--rounds",
    type=int,
    default=1,
    show_default=True,
    help="Measure each implementation this often, interleaved; keep its best round.",
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "bf16"]),
    default="float32",
    show_default=True,
    help="bf16: fmaml's forward pass under bf16 autocast (float32 parameters); peers skipped.",
)
@click.option("--no-check", is_flag=True, help="Skip the meta-gradient agreement check.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON lines.")
@friendly_errors
def bench(
    names,
    orders,
    impls,
    compare,
    repeats,
    min_seconds,
    device,
    threads,
    chunk_size,
    workers,
    checkpoint,
    isolate,
    cudnn_benchmark,
    fastest,
    rounds,
    precision,
    no_check,
    as_json,
) -> None:
    """Meta-steps/s, tasks/s, GFLOP/s and peak memory of one MAML meta-step.

    Checks first that every implementation gives the same meta-gradient (float64), then times
    fmaml's strategies (and, with --compare, learn2learn and higher, on the same data and
    initial parameters) for each setting, second- and first-order.
    """
    import torch

    from fmaml.bench import ORDERS, SETTINGS, run_bench

    if threads is not None:
        if threads < 1:
            raise click.ClickException(f"--threads must be at least 1, got {threads}.")
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = cudnn_benchmark or torch.backends.cudnn.benchmark
    overrides = _strategy_overrides(chunk_size, workers, checkpoint)
    rows = run_bench(
        names or list(SETTINGS),
        repeats=repeats,
        device=device,
        impls=impls or None,
        compare=compare,
        orders=orders or ORDERS,
        strategy=overrides,
        isolate=isolate,
        check=not no_check,
        min_seconds=min_seconds,
        fastest=fastest,
        rounds=rounds,
        precision=precision,
        say=lambda line: click.echo(line, err=as_json),
    )
    try:
        for row in rows:
            click.echo(json.dumps(row) if as_json else row["line"])
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
