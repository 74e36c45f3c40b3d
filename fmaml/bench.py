"""Meta-steps per second of the vmapped path against a Python loop over tasks.

The settings are the ones the MAML paper trains: sinusoid (MLP 40-40, meta-batch 25, K=10,
1 inner step), Omniglot-shaped (conv4-64, 28x28, 5-way 1-shot, 15 query, meta-batch 32,
1 step) and mini-ImageNet-shaped (conv4-32, 84x84, 5-way 1-shot, 15 query, meta-batch 4,
5 steps). Data is synthetic (the speed does not depend on the pixels).
"""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmaml.module import params_of, supervised_loss
from fmaml.nn import conv4, mlp
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


def build(setting: Setting, device: str):
    """Model, loss function, params and one meta-batch for ``setting``."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if setting.name == "sinusoid":
            model = mlp()
        else:
            model = conv4(setting.ways, setting.channels, setting.hidden, setting.image_size)
    model = model.to(device)
    if setting.name == "sinusoid":
        tasks = SinusoidTasks(10).sample(setting.meta_batch, generator)
        criterion = F.mse_loss
    else:
        n, size = setting.meta_batch, setting.image_size
        shape = (setting.channels, size, size)
        xs = torch.rand(n, setting.ways, *shape, generator=generator)
        xq = torch.rand(n, setting.ways * setting.query, *shape, generator=generator)
        ys = torch.arange(setting.ways).expand(n, -1)
        yq = torch.arange(setting.ways).repeat(setting.query).expand(n, -1)
        tasks = Task((xs, ys), (xq, yq))
        criterion = F.cross_entropy
    tasks = Task(*[tuple(t.to(device) for t in pair) for pair in tasks])
    return supervised_loss(model, criterion), params_of(model), tasks


def _step_vmap(loss_fn, params, tasks, setting, first_order):
    loss = meta_loss(
        loss_fn,
        params,
        tasks,
        inner_lr=setting.inner_lr,
        num_steps=setting.inner_steps,
        first_order=first_order,
    )
    torch.autograd.grad(loss, list(params.values()))


def _step_loop(loss_fn, params, tasks, setting, first_order):
    total = 0.0
    for t in range(setting.meta_batch):
        task = Task(tuple(x[t] for x in tasks.support), tuple(x[t] for x in tasks.query))
        total = total + task_loss(
            loss_fn,
            params,
            task,
            inner_lr=setting.inner_lr,
            num_steps=setting.inner_steps,
            first_order=first_order,
        )
    torch.autograd.grad(total / setting.meta_batch, list(params.values()))


STRATEGIES = {"vmap": _step_vmap, "loop": _step_loop}


def time_steps(step, repeats: int, device: str) -> float:
    """Seconds per call of ``step()``, after one warm-up call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - start) / repeats


def run_bench(names, *, repeats: int = 3, device: str = "cpu") -> Iterator[dict]:
    """Time every setting in ``names`` with each strategy, second- and first-order.

    Yields:
        One dict per measurement with ``setting``, ``strategy``, ``order``,
        ``meta_steps_per_s``, ``tasks_per_s``, ``device`` and a printable ``line``.
    """
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise ValueError(f"bench: unknown settings {unknown}; expected some of {list(SETTINGS)}.")
    if repeats < 1:
        raise ValueError(f"bench: --repeats must be at least 1, got {repeats}.")
    where = (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    for name in names:
        setting = SETTINGS[name]
        loss_fn, params, tasks = build(setting, device)
        for first_order in (False, True):
            for strategy, step in STRATEGIES.items():
                seconds = time_steps(
                    functools.partial(step, loss_fn, params, tasks, setting, first_order),
                    repeats,
                    device,
                )
                order = "first" if first_order else "second"
                row = {
                    "setting": name,
                    "strategy": strategy,
                    "order": order,
                    "meta_steps_per_s": 1 / seconds,
                    "tasks_per_s": setting.meta_batch / seconds,
                    "device": where,
                    "torch": torch.__version__,
                }
                row["line"] = (
                    f"{name:<13} {order:<6}-order {strategy:<5} "
                    f"{row['meta_steps_per_s']:9.2f} meta-steps/s "
                    f"{row['tasks_per_s']:9.1f} tasks/s   [{where}]"
                )
                yield row
