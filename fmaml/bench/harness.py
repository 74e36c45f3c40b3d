"""Meta-training speed: fmaml's strategies against learn2learn, higher and a plain loop.

The settings are the ones the MAML paper trains: sinusoid (MLP 40-40, meta-batch 25, K=10,
1 inner step), Omniglot-shaped (conv4-64 with stride-2 convolutions, 28x28, 5-way 1-shot,
15 query per class, meta-batch 32, 1 step) and mini-ImageNet-shaped (conv4-32 with max-pool,
84x84, 5-way 1-shot, 15 query, meta-batch 4, 5 steps). Data is synthetic: the speed does not
depend on the pixels, and every implementation gets the same tasks and the same initial
parameters.

For every setting and order (second- and first-order MAML) :func:`run_bench` first checks
that every implementation gives the same meta-gradient (float64, on the first tasks of the
meta-batch), then times one meta-step (the meta-gradient of the whole meta-batch) and reports
meta-steps/s, tasks/s, achieved GFLOP/s and peak memory. FLOPs are counted with
``torch.utils.flop_counter`` on the plain per-task loop and the same count is used for every
implementation (the counter charges a grouped convolution's weight gradient once per group,
so counting each implementation's own ops would credit vmap with work it does not do). On
a CPU each measurement runs in a fresh process, so that its peak resident memory is its own;
on CUDA the peak is ``torch.cuda.max_memory_allocated``.

Implementations (``--impls``):

========================  ===================================================================
``fmaml``                 :func:`fmaml.value_and_grad` with :func:`fmaml.auto_strategy` (or the
                          strategy given with ``--chunk-size``/``--workers``/``--checkpoint``)
``fmaml-vmap``            :func:`fmaml.meta_loss` (one vmap over all tasks) and its backward
``fmaml-checkpoint``      the ``fmaml`` strategy with every inner step recomputed
``fmaml-compile``         the meta-step compiled (``Strategy(compile=True)``; the MLP only:
                          the strategy refuses BatchNorm); compilation is the warm-up step,
                          reported as ``first_step_s``, not in the rates
``loop``                  :func:`fmaml.task_loss` task by task, one backward at the end
``learn2learn``           ``l2l.algorithms.MAML``: clone, adapt, backward per task
``higher``                ``higher.innerloop_ctx`` with SGD, backward per task
========================  ===================================================================

learn2learn and higher use the same network with torch's ``nn.BatchNorm2d`` (batch
statistics, no running statistics), which is what their users write.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmaml.engine.run import value_and_grad
from fmaml.engine.strategy import Strategy, auto_strategy, plan_memory
from fmaml.errors import ConfigError
from fmaml.inner_loop import InnerLoop
from fmaml.module import params_of, supervised_loss
from fmaml.nn import BatchNorm, conv4, mlp
from fmaml.nn.init import seeded
from fmaml.objectives import meta_loss, task_loss
from fmaml.tasks.sinusoid import SinusoidTasks
from fmaml.types import Task


@dataclass(frozen=True)
class Setting:
    """One benchmark setting."""

    name: str
    meta_batch: int
    inner_steps: int
    inner_lr: float
    ways: int = 0
    image_size: int = 0
    channels: int = 0
    hidden: int = 0
    query: int = 15


SETTINGS = {
    "sinusoid": Setting("sinusoid", meta_batch=25, inner_steps=1, inner_lr=0.01),
    "omniglot": Setting("omniglot", 32, 1, 0.4, ways=5, image_size=28, channels=1, hidden=64),
    "miniimagenet": Setting(
        "miniimagenet", 4, 5, 0.01, ways=5, image_size=84, channels=3, hidden=32
    ),
}

ORDERS = ("second", "first")
IMPLS = (
    "fmaml",
    "fmaml-vmap",
    "fmaml-checkpoint",
    "fmaml-compile",
    "loop",
    "learn2learn",
    "higher",
)
PEERS = {"learn2learn": "learn2learn", "higher": "higher"}
DEFAULT_IMPLS = ("fmaml", "fmaml-vmap", "loop")


@dataclass
class Problem:
    """One setting's network, loss, parameters and meta-batch, ready to time."""

    setting: Setting
    model: nn.Module
    criterion: Callable
    params: dict
    tasks: Task
    precision: str = "float32"
    """``"bf16"``: fmaml's loss runs the model's forward pass under bf16 autocast."""

    @property
    def loss_fn(self):
        autocast = torch.bfloat16 if self.precision == "bf16" else None
        return supervised_loss(self.model, self.criterion, autocast=autocast)


def build(
    setting: Setting,
    device: str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    num_tasks: int | None = None,
    precision: str = "float32",
) -> Problem:
    """The network (seeded initialisation) and one meta-batch (seeded data) for ``setting``;
    with ``precision="bf16"`` its loss runs under bf16 autocast (float32 parameters)."""
    generator = torch.Generator().manual_seed(0)

    def make() -> torch.nn.Module:
        if setting.name == "sinusoid":
            return mlp()
        return conv4(setting.ways, setting.channels, setting.hidden, setting.image_size)

    model = seeded(make, torch.Generator().manual_seed(0))
    model = model.to(device=device, dtype=dtype)
    n = setting.meta_batch
    if setting.name == "sinusoid":
        tasks = SinusoidTasks(10).sample(n, generator)
        criterion = F.mse_loss
    else:
        size = setting.image_size
        shape = (setting.channels, size, size)
        xs = torch.rand(n, setting.ways, *shape, generator=generator)
        xq = torch.rand(n, setting.ways * setting.query, *shape, generator=generator)
        ys = torch.arange(setting.ways).expand(n, -1)
        yq = torch.arange(setting.ways).repeat(setting.query).expand(n, -1)
        tasks = Task((xs, ys), (xq, yq))
        criterion = F.cross_entropy
    keep = n if num_tasks is None else min(num_tasks, n)
    tasks = Task(
        *[
            tuple(
                (t[:keep].to(dtype) if t.is_floating_point() else t[:keep]).to(device) for t in pair
            )
            for pair in tasks
        ]
    )
    return Problem(setting, model, criterion, params_of(model), tasks, precision)


# --- the implementations: each returns step() -> meta-gradient, in the order of params -------


def _fmaml_step(problem: Problem, first_order: bool, strategy: Strategy | None):
    s, params = problem.setting, problem.params
    loss_fn, leaves = problem.loss_fn, list(params.values())

    inner = InnerLoop(s.inner_lr, s.inner_steps, first_order=first_order)

    def step():
        if strategy is None:  # the definition: one vmap, autograd's own backward
            return torch.autograd.grad(meta_loss(loss_fn, params, problem.tasks, inner), leaves)
        _, grads = value_and_grad(loss_fn, params, problem.tasks, inner, strategy=strategy)
        return [grads.params[k] for k in params]

    return step


def _loop_step(problem: Problem, first_order: bool):
    s, params, tasks = problem.setting, problem.params, problem.tasks
    loss_fn, leaves = problem.loss_fn, list(params.values())
    num_tasks = tasks.support[0].shape[0]
    inner = InnerLoop(s.inner_lr, s.inner_steps, first_order=first_order)

    def step():
        total = 0.0
        for t in range(num_tasks):
            task = Task(tuple(x[t] for x in tasks.support), tuple(x[t] for x in tasks.query))
            total = total + task_loss(loss_fn, params, task, inner)
        return torch.autograd.grad(total / num_tasks, leaves)

    return step


def torch_batchnorm_twin(problem: Problem) -> nn.Module:
    """The setting's network with torch's ``nn.BatchNorm2d`` (batch statistics) and the same
    initial parameters: what a learn2learn or higher user would train."""
    model = copy.deepcopy(problem.model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, BatchNorm):
                twin = nn.BatchNorm2d(
                    child.num_features,
                    eps=child.eps,
                    affine=child.weight is not None,
                    track_running_stats=False,
                )
                setattr(parent, name, twin)
    model = model.to(device=problem.tasks.support[0].device)
    model = model.to(dtype=next(iter(problem.params.values())).dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(problem.params[name])
    return model


def _learn2learn_step(problem: Problem, first_order: bool):
    import learn2learn as l2l

    s, tasks, criterion = problem.setting, problem.tasks, problem.criterion
    model = torch_batchnorm_twin(problem)
    maml = l2l.algorithms.MAML(model, lr=s.inner_lr, first_order=first_order)
    leaves = list(model.parameters())
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    num_tasks = xs.shape[0]

    def step():
        for p in leaves:
            p.grad = None
        for t in range(num_tasks):
            learner = maml.clone()
            for _ in range(s.inner_steps):
                learner.adapt(criterion(learner(xs[t]), ys[t]))
            (criterion(learner(xq[t]), yq[t]) / num_tasks).backward()
        return [p.grad for p in leaves]

    return step


def _higher_step(problem: Problem, first_order: bool):
    import higher

    s, tasks, criterion = problem.setting, problem.tasks, problem.criterion
    model = torch_batchnorm_twin(problem)
    inner_opt = torch.optim.SGD(model.parameters(), lr=s.inner_lr)
    leaves = list(model.parameters())
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    num_tasks = xs.shape[0]

    def step():
        for p in leaves:
            p.grad = None
        for t in range(num_tasks):
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
            ) as (fmodel, diffopt):
                for _ in range(s.inner_steps):
                    diffopt.step(criterion(fmodel(xs[t]), ys[t]))
                query = criterion(fmodel(xq[t]), yq[t]) / num_tasks
                if not first_order:
                    query.backward()
                    continue
                # Untracked inner steps leave fresh leaves: hand their gradients back (FOMAML).
                for p, g in zip(
                    leaves, torch.autograd.grad(query, list(fmodel.parameters())), strict=True
                ):
                    p.grad = g if p.grad is None else p.grad + g
        return [p.grad for p in leaves]

    return step


def chosen_strategy(problem: Problem, strategy: Strategy | Mapping | None) -> Strategy:
    """The ``fmaml`` implementation's strategy: ``strategy`` itself, or
    :func:`fmaml.auto_strategy`'s choice for the problem with the fields of a dict
    ``strategy`` replaced."""
    if isinstance(strategy, Strategy):
        return strategy
    (support_x, _), (query_x, _) = problem.tasks
    chosen = auto_strategy(
        support_x.device,
        problem.loss_fn,
        num_tasks=problem.setting.meta_batch,
        examples_per_task=support_x.shape[1] + query_x.shape[1],
    )
    return dataclasses.replace(chosen, **(strategy or {}))


def make_step(
    impl: str, problem: Problem, first_order: bool, strategy: Strategy | Mapping | None = None
):
    """``step()`` computing one meta-gradient with implementation ``impl``."""
    if impl in _FMAML_IMPLS:
        used = _fmaml_strategy(impl, problem, strategy)
        return _fmaml_step(problem, first_order, None if impl == "fmaml-vmap" else used)
    if impl == "loop":
        return _loop_step(problem, first_order)
    if impl == "learn2learn":
        return _learn2learn_step(problem, first_order)
    if impl == "higher":
        return _higher_step(problem, first_order)
    raise ConfigError(f"bench: unknown implementation {impl!r}; expected one of {list(IMPLS)}.")


_FMAML_IMPLS = ("fmaml", "fmaml-vmap", "fmaml-checkpoint", "fmaml-compile")


def _fmaml_strategy(impl: str, problem: Problem, strategy: Strategy | Mapping | None) -> Strategy:
    """The strategy an fmaml implementation runs (``fmaml-vmap``: the definition's one vmap,
    which :class:`fmaml.Strategy` ``()`` computes alike)."""
    chosen = chosen_strategy(problem, strategy)
    return {
        "fmaml": chosen,
        "fmaml-vmap": Strategy(),
        "fmaml-checkpoint": dataclasses.replace(chosen, checkpoint=True),
        "fmaml-compile": Strategy(compile=True, threads=chosen.threads),
    }[impl]


def not_applicable(impl: str, setting: Setting, precision: str = "float32") -> str | None:
    """Why ``impl`` does not run ``setting`` at ``precision`` (``None``: it does)."""
    if precision == "bf16" and impl in PEERS:
        return (
            f"{impl} with --precision bf16: bf16 autocast is fmaml's setting; the peers are "
            "timed in float32 (run bench without --precision bf16)"
        )
    if impl == "fmaml-compile" and setting.name != "sinusoid":
        return (
            f"fmaml-compile on {setting.name}: Strategy(compile=True) refuses models with "
            "BatchNorm (see benchmarks/README.md)"
        )
    return None


def strategy_of(impl: str, problem: Problem, strategy: Strategy | Mapping | None) -> str:
    """How ``impl`` runs a meta-batch, in words."""
    if impl in _FMAML_IMPLS:
        return str(_fmaml_strategy(impl, problem, strategy))
    return {
        "loop": "python loop over tasks, one backward",
        "learn2learn": "python loop over tasks, backward per task",
        "higher": "python loop over tasks, backward per task",
    }[impl]


# --- checks and measurements -------------------------------------------------------------------


def peer_missing(impl: str) -> str | None:
    """Why a peer implementation can't run here, or ``None`` when it can."""
    package = PEERS.get(impl)
    if package is None:
        return None
    if importlib.util.find_spec(package) is None:
        return f"{impl} is not installed (see benchmarks/README.md)"
    try:
        importlib.import_module(package)
    except Exception as error:  # a broken install: say why and go on without it
        return f"{impl} does not import: {type(error).__name__}: {error}"
    return None


def gradient_check(
    setting: Setting,
    impls: Sequence[str],
    first_order: bool,
    *,
    device: str = "cpu",
    strategy: Strategy | Mapping | None = None,
    num_tasks: int = 4,
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """Each implementation's largest deviation from the loop's meta-gradient.

    The deviation is ``max |g - g_loop| / max |g_loop|`` over every parameter, on the first
    ``num_tasks`` tasks of the meta-batch, in ``dtype``.
    """
    problem = build(setting, device, dtype=dtype, num_tasks=num_tasks)
    reference = make_step("loop", problem, first_order)()
    scale = max(r.abs().max().item() for r in reference)
    deviations = {}
    for impl in impls:
        grads = make_step(impl, problem, first_order, strategy)()
        deviations[impl] = max(
            (g - r).abs().max().item() / scale for g, r in zip(grads, reference, strict=True)
        )
    return deviations


def count_flops(setting: Setting, first_order: bool, device: str = "cpu") -> int:
    """FLOPs of one meta-step, counted by ``torch.utils.flop_counter`` on the per-task loop."""
    from torch.utils.flop_counter import FlopCounterMode

    problem = build(setting, device)
    step = make_step("loop", problem, first_order)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def time_steps(step: Callable, repeats: int, device: str, min_seconds: float = 1.0) -> list[float]:
    """Seconds of each call of ``step()``: one warm-up call, then at least ``repeats`` calls
    and at least ``min_seconds`` of them."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    step()
    sync()
    times, begin = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - begin < min_seconds:
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def interleaved_rates(
    steps: Mapping[str, Callable[[], object]], rounds: int, seconds: float
) -> dict[str, list[float]]:
    """Steps per second of each ``steps[label]()`` in each of ``rounds`` rounds.

    Every step is called once to warm up; then each round runs every step in turn (so that a
    busy spell of the machine hits them alike) for at least ``seconds`` and 2 calls.
    """
    for step in steps.values():
        step()
    rates: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            count, begin = 0, time.perf_counter()
            while count < 2 or time.perf_counter() - begin < seconds:
                step()
                count += 1
            rates[label].append(count / (time.perf_counter() - begin))
    return rates


def _rss_peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss`` it is not inherited
    from the parent across ``fork``/``exec``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    setting: str,
    order: str,
    impl: str,
    *,
    repeats: int = 3,
    device: str = "cpu",
    strategy: Strategy | Mapping | None = None,
    min_seconds: float = 1.0,
    precision: str = "float32",
) -> dict:
    """Time one implementation on one setting in this process; peak memory included."""
    problem = build(SETTINGS[setting], device, precision=precision)
    step = make_step(impl, problem, order == "first", strategy)
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_peak_mb()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    step()  # the first step: compilation, lazy initialisation
    sync()
    first = time.perf_counter() - start
    times = time_steps(step, repeats, device, min_seconds)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_peak_mb()
    estimate = None
    if impl in _FMAML_IMPLS:  # the plan's estimate, beside the peak (after it: it runs a task)
        s = problem.setting
        inner = InnerLoop(s.inner_lr, s.inner_steps, first_order=order == "first")
        used = _fmaml_strategy(impl, problem, strategy)
        args = (problem.loss_fn, problem.params, problem.tasks, inner)
        estimate = plan_memory(*args, strategy=used).estimate / 2**20
    return {
        "seconds_per_step": sum(times) / len(times),
        "fastest_step_s": min(times),
        "first_step_s": first,
        "timed_steps": len(times),
        "peak_memory_mb": peak,
        "memory_before_mb": before,
        "peak_growth_mb": peak - before,
        "estimate_mb": estimate,
        "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS of the process",
    }


def run_json_job(command: list[str], job: dict, what: str, env: dict | None = None) -> dict:
    """Run ``command`` in a fresh process with ``job`` as JSON on its standard input; return
    the last line it prints, parsed as JSON. fmaml's folder is put first on ``PYTHONPATH``.

    Raises:
        RuntimeError: the process failed or printed nothing; names ``what`` and ends with
            the end of its standard error.
    """
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        command, input=json.dumps(job), capture_output=True, text=True, env=env, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed in its subprocess:\n{done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def _measure_in_subprocess(job: dict) -> dict:
    """:func:`measure` in a fresh Python process (its own peak RSS), same torch threads."""
    return run_json_job(
        [sys.executable, "-c", "import fmaml.bench.harness as b; b._worker()"],
        job,
        f"bench: measuring {job['impl']} on {job['setting']}",
    )


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job.pop("threads"))
    strategy = job.pop("strategy")
    job["strategy"] = None if strategy is None else Strategy(**strategy)
    print(json.dumps(measure(job.pop("setting"), job.pop("order"), job.pop("impl"), **job)))


def describe_device(device: str) -> str:
    """The device in words: the GPU's name, or the CPU model and torch's thread count."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def run_bench(
    names: Sequence[str],
    *,
    repeats: int = 3,
    device: str = "cpu",
    impls: Sequence[str] | None = None,
    compare: bool = False,
    orders: Sequence[str] = ORDERS,
    strategy: Strategy | Mapping | None = None,
    isolate: bool | None = None,
    check: bool = True,
    min_seconds: float = 1.0,
    fastest: bool = False,
    rounds: int = 1,
    precision: str = "float32",
    say: Callable[[str], None] = lambda line: None,
) -> Iterator[dict]:
    """Check, then time, every implementation on every setting and order.

    Args:
        names: settings, from :data:`SETTINGS`.
        repeats: timed meta-steps at least (after one warm-up step).
        device: ``"cpu"`` or ``"cuda[:i]"``.
        impls: implementations to run; default ``fmaml``, ``fmaml-vmap`` and ``loop``;
            ``compare`` adds ``learn2learn`` and ``higher``.
        compare: add the peers and report each implementation's speed relative to them.
        orders: ``"second"`` and/or ``"first"``.
        strategy: the strategy of the ``fmaml`` implementation: a :class:`fmaml.Strategy`,
            or a dict of fields to change in :func:`fmaml.auto_strategy`'s choice for each
            setting; default that choice.
        isolate: measure each in a fresh process (default: on a CPU, for its peak RSS).
        check: compare the meta-gradients first (float64) and stop if one differs.
        min_seconds: time at least this long per measurement.
        fastest: rates from the fastest timed step instead of the mean (for a machine that
            other work keeps busy).
        rounds: measure every implementation this many times, interleaved, and keep each
            one's best round (for a busy machine); peak memory is the largest seen.
        precision: ``"float32"``, or ``"bf16"``: fmaml's implementations (and the loop, which
            uses fmaml's loss) run the forward pass under bf16 autocast with float32
            parameters; the peers are skipped. The float64 gradient check is unchanged (it
            checks the implementations, not the precision).
        say: called with progress and skip messages.

    Yields:
        One dict per measurement (``setting``, ``order``, ``impl``, ``strategy``,
        ``meta_steps_per_s``, ``tasks_per_s``, ``gflop_per_s``, ``peak_memory_mb``, ratios,
        ``device``, ``torch``, ``date``, ``line``) and, with ``compare``, one ``summary`` row
        per setting and order.

    Raises:
        ValueError: unknown settings, implementations or orders; ``repeats`` below 1.
        RuntimeError: an implementation whose meta-gradient differs from the loop's.
    """
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"bench: unknown settings {unknown}; expected some of {list(SETTINGS)}.")
    if repeats < 1:
        raise ConfigError(f"bench: --repeats must be at least 1, got {repeats}.")
    if rounds < 1:
        raise ConfigError(f"bench: --rounds must be at least 1, got {rounds}.")
    if precision not in ("float32", "bf16"):
        raise ConfigError(f"bench: --precision must be 'float32' or 'bf16', got {precision!r}.")
    bad_orders = sorted(set(orders) - set(ORDERS))
    if bad_orders:
        raise ConfigError(f"bench: unknown orders {bad_orders}; expected some of {list(ORDERS)}.")
    impls = list(impls or DEFAULT_IMPLS)
    impls += [peer for peer in PEERS if compare and peer not in impls]
    bad_impls = sorted(set(impls) - set(IMPLS))
    if bad_impls:
        raise ConfigError(f"bench: unknown implementations {bad_impls}; expected {list(IMPLS)}.")
    runnable = []
    for impl in impls:
        why = peer_missing(impl)
        if why:
            say(f"skipped: {why}")
        else:
            runnable.append(impl)
    cuda = str(device).startswith("cuda")
    isolate = (not cuda) if isolate is None else isolate
    where = describe_device(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for name in names:
        setting = SETTINGS[name]
        for impl in runnable:
            why = not_applicable(impl, setting, precision)
            if why:
                say(f"skipped: {why}")
        here = [impl for impl in runnable if not not_applicable(impl, setting, precision)]
        for order in orders:
            first_order = order == "first"
            if check:
                deviations = gradient_check(
                    setting, here, first_order, device=device, strategy=strategy
                )
                worst = max(deviations.values(), default=0.0)
                say(
                    f"{name} {order}-order: meta-gradients agree across "
                    f"{', '.join(here)} (float64, largest relative deviation {worst:.1e})"
                )
                wrong = {k: v for k, v in deviations.items() if not v < 1e-8}
                if wrong:
                    raise RuntimeError(
                        f"bench: on {name} ({order} order) these implementations give another "
                        f"meta-gradient than the loop (relative deviation): {wrong}."
                    )
            flops = count_flops(setting, first_order, device)
            problem = build(setting, device, num_tasks=1, precision=precision)
            key = "fastest_step_s" if fastest else "seconds_per_step"
            seen: dict[str, list[dict]] = {impl: [] for impl in here}
            for _ in range(rounds):  # interleaved, so that a busy spell hits every impl
                for impl in here:
                    job = {
                        "setting": name,
                        "order": order,
                        "impl": impl,
                        "repeats": repeats,
                        "device": device,
                        "min_seconds": min_seconds,
                        "precision": precision,
                    }
                    if isolate:
                        job["threads"] = torch.get_num_threads()
                        job["strategy"] = dataclasses.asdict(chosen_strategy(problem, strategy))
                        seen[impl].append(_measure_in_subprocess(job))
                    else:
                        seen[impl].append(measure(**job, strategy=strategy))
            best = {
                impl: {
                    **min(results, key=lambda r: r[key]),
                    "peak_memory_mb": max(r["peak_memory_mb"] for r in results),
                    "round_seconds": [r[key] for r in results],
                }
                for impl, results in seen.items()
            }
            rows = []
            for impl in here:
                result = best[impl]
                seconds = result[key]
                row = {
                    "setting": name,
                    "order": order,
                    "impl": impl,
                    "precision": precision,
                    "strategy": strategy_of(impl, problem, strategy),
                    "meta_steps_per_s": 1 / seconds,
                    "tasks_per_s": setting.meta_batch / seconds,
                    "gflop_per_step": flops / 1e9,
                    "gflop_per_s": flops / 1e9 / seconds,
                    "rate_from": ("fastest step" if fastest else "mean step")
                    + (f", best of {rounds} interleaved rounds" if rounds > 1 else ""),
                    **result,
                    "device": where,
                    "torch": torch.__version__,
                    "date": date,
                }
                if cuda:
                    row["cudnn_benchmark"] = torch.backends.cudnn.benchmark
                    row["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
                row["line"] = (
                    f"{name:<12} {order:<6} {impl:<16} {row['meta_steps_per_s']:9.3f} steps/s "
                    f"{row['tasks_per_s']:9.1f} tasks/s {row['gflop_per_s']:7.1f} GFLOP/s "
                    f"{row['peak_memory_mb']:8.0f} MB  [{row['strategy']}"
                    + ("; bf16 autocast]" if precision == "bf16" else "]")
                )
                if row.get("estimate_mb") is not None:
                    row["line"] += (
                        f" step +{row['peak_growth_mb']:.0f} MB, plan estimate "
                        f"+{row['estimate_mb']:.0f} MB"
                    )
                rows.append(row)
            yield from _with_ratios(rows, compare)


def _with_ratios(rows: list[dict], compare: bool) -> Iterator[dict]:
    speed = {r["impl"]: r["meta_steps_per_s"] for r in rows}
    memory = {r["impl"]: r["peak_memory_mb"] for r in rows}
    peers = [p for p in PEERS if p in speed]
    for row in rows:
        for peer in peers:
            row[f"vs_{peer}"] = row["meta_steps_per_s"] / speed[peer]
        if peers:
            row["line"] += "  " + "  ".join(f"{row[f'vs_{p}']:.2f}x {p}" for p in peers)
        yield row
    if compare and peers and "fmaml" in speed:
        fastest = max(peers, key=speed.get)
        first = rows[0]
        summary = {
            "summary": True,
            "setting": first["setting"],
            "order": first["order"],
            "fastest_peer": fastest,
            "speedup_vs_fastest_peer": speed["fmaml"] / speed[fastest],
            "memory_vs_fastest_peer": memory["fmaml"] / memory[fastest],
        }
        summary["line"] = (
            f"{first['setting']:<12} {first['order']:<6} fmaml is "
            f"{summary['speedup_vs_fastest_peer']:.2f}x the fastest peer ({fastest}), "
            f"peak memory {memory['fmaml']:.0f} MB vs {memory[fastest]:.0f} MB"
        )
        yield summary
