"""Data-parallel meta-training: 2 ranks (gloo, CPU) give the tasks, gradients and model of 1.

The library tests run every two-rank job in one pair of spawned processes (a module fixture);
the command-line tests start real ``torchrun`` jobs, kill a rank, and resume.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from conftest_images import make_omniglot

import fmaml
import fmaml.training.train as train_module
from fmaml.training import distributed
from fmaml.training.checkpoint import load_checkpoint
from fmaml.training.cli import main
from fmaml.training.config import TrainConfig, resolve
from fmaml.training.distributed import task_range
from fmaml.training.train import (
    build_problem,
    evaluate_state,
    init_state,
    meta_gradient,
    restore_state,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIGHT = dict(rtol=1e-12, atol=1e-14)
"""float64, the same tasks, only the order of the sums differs."""


def assert_tight(mine: list, theirs: list):
    """Equal to 1e-12 of the largest entry: an entry near 0 is roundoff from cancellation (a
    conv bias before BatchNorm has a meta-gradient of exactly 0 in exact arithmetic)."""
    assert len(mine) == len(theirs)
    scale = max(float(t.abs().max()) for t in theirs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * scale)


def tiny(**changes) -> TrainConfig:
    values = dict(
        dataset="sinusoid",
        iterations=40,
        meta_batch=5,  # 3 + 2 tasks on two ranks: an uneven split
        val_every=20,
        val_episodes=7,
        checkpoint_every=20,
        log_every=5,
        hidden=8,
        dtype="float64",
        keep_best=True,  # best.pt is compared across ranks
    )
    values.update(changes)
    return TrainConfig(**values)


def omniglot(root: Path, **changes) -> TrainConfig:
    """conv4 with BatchNorm on generated glyphs, rotated per task (the MAML protocol)."""
    values = dict(
        dataset="omniglot",
        data_root=str(root),
        split="character:0.5,0.25,0.25",
        ways=2,
        shots=1,
        query=2,
        meta_batch=5,
        hidden=4,
        image_size=12,
        iterations=6,
        val_every=3,
        val_episodes=5,
        checkpoint_every=3,
        log_every=1,
        dtype="float64",
    )
    values.update(changes)
    return TrainConfig(**values)


def assert_params_close(a, b, **tolerance):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].detach(), b[k].detach(), **(tolerance or TIGHT))


def quadratic(params, batch):
    target, _ = batch
    return 0.5 * ((params["w"] - target) ** 2).sum()


# --- one process: shares, shards and fingerprints ----------------------------------------------


def test_task_range_splits_evenly_in_rank_order():
    for num_items in range(0, 12):
        for world_size in range(1, 5):
            shares = [task_range(num_items, r, world_size) for r in range(world_size)]
            assert shares[0][0] == 0 and shares[-1][1] == num_items
            assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
            sizes = [stop - start for start, stop in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match=r"need 0 <= rank < world_size, got rank=2"):
        task_range(5, 2, 2)


@pytest.fixture
def glyphs(tmp_path, isolated_cache):
    make_omniglot(tmp_path / "omni", {f"Alpha{i}": 4 for i in range(4)}, images_per_character=5)
    return tmp_path / "omni"


def test_a_shard_is_the_same_tasks_and_advances_the_generator_alike(glyphs):
    for config in (tiny(), omniglot(glyphs)):
        problem = build_problem(resolve(config))
        whole_gen, part_gen = (torch.Generator().manual_seed(3) for _ in range(2))
        whole = problem.sample(5, whole_gen)
        part = problem.sample(5, part_gen, shard=(3, 5))
        assert torch.equal(whole_gen.get_state(), part_gen.get_state())
        for w, p in zip([*whole.support, *whole.query], [*part.support, *part.query]):
            assert torch.equal(w[3:5], p)
        chunks = list(problem.episodes("test", 7, 11, 2))
        shard = list(problem.episodes("test", 7, 11, 2, shard=(3, 7)))
        assert [len(t.support[0]) for t in shard] == [2, 2]
        joined = torch.cat([t.query[0] for t in chunks])
        assert torch.equal(torch.cat([t.query[0] for t in shard]), joined[3:7])


def test_fingerprint_sees_values_dtypes_and_order():
    a = {"w": torch.arange(3.0), "b": torch.zeros(2)}
    assert distributed.fingerprint(a) == distributed.fingerprint({"b": torch.zeros(2), **a})
    assert distributed.fingerprint(a) != distributed.fingerprint({**a, "w": torch.arange(3.0) + 1})
    assert distributed.fingerprint(a) != distributed.fingerprint(
        {**a, "b": torch.zeros(2).double()}
    )
    assert 0 <= distributed.fingerprint([1, "x"]) < 2**52


def test_torchrun_environment():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert distributed.launched_by_torchrun(env)
    assert not distributed.launched_by_torchrun({k: v for k, v in env.items() if k != "RANK"})
    assert distributed.restart_count({**env, "TORCHELASTIC_RESTART_COUNT": "2"}) == 2
    assert distributed.restart_count(env) == 0
    assert distributed.current() is None, "no process group: no collectives"
    # a job's store is scoped per restart only where every worker counts restarts alike
    assert distributed._attempt_store(env) is None, "not torchrun's agent store"
    several = {**env, "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2"}
    assert distributed._attempt_store(several) is None, "several agents: counts may differ"
    assert distributed.backend() == ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def test_cli_under_torchrun_needs_a_run_folder(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")

    def must_not_join():
        raise AssertionError("the folder is checked before joining the job (which would wait)")

    monkeypatch.setattr(distributed, "init_from_env", must_not_join)
    result = CliRunner().invoke(main, ["train", "--dataset", "sinusoid"])
    assert result.exit_code == 2
    assert "under torchrun, name the run folder with --out RUN_DIR" in result.output


# --- two ranks through the library --------------------------------------------------------------


def _rank_main(rank: int, world_size: int, store: str, jobs: list, results_path: str) -> None:
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    try:
        for name, job, kwargs in jobs:
            try:
                results[name] = JOBS[job](rank, **kwargs)
            except Exception as error:
                results[name] = {"raised": f"{type(error).__name__}: {error}"}
                if not isinstance(error, (ValueError, FloatingPointError, RuntimeError)):
                    results[name]["traceback"] = traceback.format_exc()
    finally:
        torch.save(results, results_path)
        torch.distributed.destroy_process_group()


def _job_gradient(rank, config):
    state = init_state(config)
    metrics = meta_gradient(state, distributed.current())
    return {"grads": [leaf.grad.clone() for leaf in state.leaves()], "metrics": metrics}


def _job_closed_form(rank, w, c_s, c_q, rate, num_steps, first_order):
    """The recipe for a hand-written loop: weight the share, SUM-all-reduce the gradients."""
    ranks = distributed.current()
    start, stop = ranks.share(len(c_s))
    params = {"w": w.clone().requires_grad_()}
    tasks = fmaml.Task(support=(c_s[start:stop],) * 2, query=(c_q[start:stop],) * 2)
    loss = fmaml.meta_loss(
        quadratic,
        params,
        tasks,
        fmaml.InnerLoop(rate, num_steps=num_steps, first_order=first_order),
    )
    (loss * (stop - start) / len(c_s)).backward()
    ranks.all_reduce_gradients(params.values())
    return {"grad": params["w"].grad}


def _job_train(rank, config=None, out=None, copy_to=None, **kwargs):
    if isinstance(config, list):  # a setting per rank: a misconfigured launch
        config = config[rank]
    state = train(config, out, **kwargs)
    if copy_to is not None and rank == 0:
        shutil.copytree(out, copy_to)
    torch.distributed.barrier()
    return {"params": dict(state.params), "iteration": state.iteration, "best": state.best}


def _job_nan_on_rank_one(rank, config, out):
    real = train_module.value_and_grad
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, grads, score = real(*args, **kwargs)
        if calls["n"] <= 25:
            return loss, grads, score
        nan = [None if g is None else g * float("nan") for g in grads.wrt]
        return loss * float("nan"), grads._replace(wrt=nan), score

    train_module.value_and_grad = poisoned if rank == 1 else real
    try:
        train(config, out)
    finally:
        train_module.value_and_grad = real
    return {}


def _job_evaluate(rank, checkpoint, **kwargs):
    return evaluate_state(restore_state(checkpoint), **kwargs)


JOBS = {
    "gradient": _job_gradient,
    "closed_form": _job_closed_form,
    "train": _job_train,
    "nan": _job_nan_on_rank_one,
    "evaluate": _job_evaluate,
}


def run_ranks(folder: Path, jobs: list, world_size: int = WORLD, timeout: float = 240) -> list:
    """Run ``jobs`` ([(name, job, kwargs)]) on ``world_size`` spawned ranks; per-rank results."""
    context = mp.get_context("spawn")
    paths = [folder / f"rank{r}.pt" for r in range(world_size)]
    procs = [
        context.Process(
            target=_rank_main, args=(r, world_size, str(folder / "store"), jobs, str(paths[r]))
        )
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.time() + timeout
    for proc in procs:
        proc.join(max(deadline - time.time(), 1))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [p.exitcode for p in procs] == [0] * world_size, "a rank failed or hung"
    return [torch.load(path, weights_only=False) for path in paths]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Single-process references here, then every two-rank job in one spawn."""
    tmp = tmp_path_factory.mktemp("ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMAML_CACHE", str(tmp / "cache"))
        patch.setenv("OMP_NUM_THREADS", "1")
        make_omniglot(tmp / "omni", {f"Alpha{i}": 4 for i in range(4)}, images_per_character=5)
        omni = omniglot(tmp / "omni")
        g = torch.Generator().manual_seed(0)
        quad = dict(
            w=torch.randn(3, generator=g, dtype=torch.float64),
            c_s=torch.randn(5, 3, generator=g, dtype=torch.float64),
            c_q=torch.randn(5, 3, generator=g, dtype=torch.float64),
            rate=0.3,
            num_steps=2,
        )
        one = {
            "one": train(tiny(), tmp / "one"),
            "p20": train(tiny(), tmp / "p20", iterations=20),
            "omni": train(omni, tmp / "omni-one"),
        }
        for name, config in [
            ("gradient-maml", tiny()),
            ("gradient-metasgd", tiny(algorithm="metasgd", inner_steps=2)),
            ("gradient-omniglot", omni),
        ]:
            state = init_state(config)
            one[name] = {"metrics": meta_gradient(state), "grads": state.leaves()}
        jobs = [
            ("gradient-maml", "gradient", dict(config=tiny())),
            ("gradient-metasgd", "gradient", dict(config=tiny(algorithm="metasgd", inner_steps=2))),
            ("gradient-omniglot", "gradient", dict(config=omni)),
            ("closed-form", "closed_form", dict(**quad, first_order=False)),
            ("closed-form-fo", "closed_form", dict(**quad, first_order=True)),
            # a 2-rank run to 20, copied, then resumed on 2 ranks to 40
            (
                "q20",
                "train",
                dict(config=tiny(), out=tmp / "q", iterations=20, copy_to=tmp / "q20"),
            ),
            ("q", "train", dict(out=tmp / "q", resume=True)),
            # a 1-process checkpoint resumed on 2 ranks
            ("p", "train", dict(out=tmp / "p20", resume=True)),
            ("omni", "train", dict(config=omni, out=tmp / "omni-two")),
            ("refused", "train", dict(config=tiny(), out=tmp / "q")),
            ("mismatch", "train", dict(config=[tiny(seed=0), tiny(seed=1)], out=tmp / "mismatch")),
            ("too-few-tasks", "train", dict(config=tiny(meta_batch=1), out=tmp / "few")),
            ("nan", "nan", dict(config=tiny(), out=tmp / "nan")),
            ("eval-7", "evaluate", dict(checkpoint=tmp / "one" / "best.pt", num_episodes=7)),
            ("eval-1", "evaluate", dict(checkpoint=tmp / "one" / "best.pt", num_episodes=1)),
            (
                "eval-omni",
                "evaluate",
                dict(checkpoint=tmp / "omni-one" / "latest.pt", num_episodes=9),
            ),
        ]
        ranks = run_ranks(tmp, jobs)
    return {"tmp": tmp, "one": one, "ranks": ranks, "quad": quad}


def result(two_ranks, name, rank=0):
    found = two_ranks["ranks"][rank][name]
    assert "traceback" not in found, found["traceback"]
    return found


@pytest.mark.parametrize("name", ["gradient-maml", "gradient-metasgd", "gradient-omniglot"])
@pytest.mark.slow
def test_two_ranks_give_the_meta_gradient_of_one_process(two_ranks, name):
    one = two_ranks["one"][name]
    for rank in range(WORLD):
        got = result(two_ranks, name, rank)
        assert "raised" not in got, got
        assert_tight(got["grads"], [leaf.grad for leaf in one["grads"]])
        for key, value in one["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, rel=1e-12)


@pytest.mark.slow
def test_second_order_meta_gradient_stays_exact_across_ranks(two_ranks):
    """L(w) = 1/2 ||w - c||^2: MAML's meta-gradient is the mean of (1-a)^k (w_k - c_q)."""
    q = two_ranks["quad"]
    w_k = q["c_s"] + (1 - q["rate"]) ** q["num_steps"] * (q["w"] - q["c_s"])
    second = ((1 - q["rate"]) ** q["num_steps"] * (w_k - q["c_q"])).mean(0)
    first = (w_k - q["c_q"]).mean(0)
    for rank in range(WORLD):
        torch.testing.assert_close(result(two_ranks, "closed-form", rank)["grad"], second, **TIGHT)
        torch.testing.assert_close(
            result(two_ranks, "closed-form-fo", rank)["grad"], first, **TIGHT
        )


@pytest.mark.slow
def test_two_ranks_train_the_model_of_one_process_and_resume_across_world_sizes(two_ranks):
    tmp, one = two_ranks["tmp"], two_ranks["one"]["one"]
    for name in ("q", "p"):  # 2 ranks resuming a 2-rank and a 1-process checkpoint
        for rank in range(WORLD):
            got = result(two_ranks, name, rank)
            assert got["iteration"] == 40
            assert_params_close(got["params"], one.params)
    resumed = train(None, tmp / "q20", resume=True)  # a 2-rank checkpoint in one process
    assert resumed.iteration == 40
    assert_params_close(resumed.params, one.params)
    rows = [json.loads(line) for line in (tmp / "q" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["split"] == "val"] == [20, 40], "rank 0 alone logs"
    reference = [
        json.loads(line) for line in (tmp / "one" / "metrics.jsonl").read_text().splitlines()
    ]
    for mine, theirs in zip(rows, reference):
        for key in ("loss", "mse", "score", "ci95"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-10), (key, mine, theirs)


@pytest.mark.slow
def test_two_ranks_train_conv4_with_batchnorm_like_one_process(two_ranks):
    one = two_ranks["one"]["omni"]
    # A conv bias feeding BatchNorm has a meta-gradient of exactly 0; in floating point it is
    # roundoff (~1e-15) that Adam scales up to lr-sized steps, differently for any sum order.
    # It cannot change the network's output, so it is left out.
    inert = [k for k in one.params if k.endswith("conv.bias")]
    assert len(inert) == 4
    params = {k: v for k, v in one.params.items() if k not in inert}
    for rank in range(WORLD):
        got = result(two_ranks, "omni", rank)
        mine = {k: v for k, v in got["params"].items() if k not in inert}
        assert_params_close(mine, params, rtol=1e-10, atol=1e-12)
        assert got["best"]["iteration"] == one.best["iteration"]
        assert got["best"]["score"] == pytest.approx(one.best["score"], abs=1e-12)


@pytest.mark.slow
def test_every_rank_stops_alike_on_errors(two_ranks):
    tmp = two_ranks["tmp"]
    for rank in range(WORLD):
        assert "already holds a run" in result(two_ranks, "refused", rank)["raised"]
        mismatch = result(two_ranks, "mismatch", rank)["raised"]
        assert f"rank {rank} of 2: the ranks disagree on ['settings', 'parameters', " in mismatch
        assert (
            "--meta-batch 1 is smaller than the 2 ranks"
            in result(two_ranks, "too-few-tasks", rank)["raised"]
        )
    assert not (tmp / "mismatch" / "latest.pt").exists()


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_before_the_step(two_ranks):
    tmp = two_ranks["tmp"]
    for rank in range(WORLD):
        message = result(two_ranks, "nan", rank)["raised"]
        assert message.startswith("NonFiniteError: train(): the meta-loss is nan at iteration 26")
        assert "(non-finite on rank [1])" in message
        assert f"last good checkpoint: {tmp / 'nan' / 'latest.pt'} (iteration 20)" in message
    saved = load_checkpoint(tmp / "nan" / "latest.pt")
    assert saved["iteration"] == 20
    assert all(torch.isfinite(v).all() for v in saved["params"].values())


@pytest.mark.parametrize(
    ("name", "checkpoint", "episodes"),
    [
        ("eval-7", "one/best.pt", 7),
        ("eval-1", "one/best.pt", 1),
        ("eval-omni", "omni-one/latest.pt", 9),
    ],
)
@pytest.mark.slow
def test_evaluation_split_across_ranks_reports_the_single_process_numbers(
    two_ranks, name, checkpoint, episodes
):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMAML_CACHE", str(two_ranks["tmp"] / "cache"))
        alone = evaluate_state(restore_state(two_ranks["tmp"] / checkpoint), num_episodes=episodes)
    for rank in range(WORLD):
        report = result(two_ranks, name, rank)
        assert report["episodes"] == episodes
        for mine, theirs in zip(report["steps"], alone["steps"]):
            for key in ("mean", "ci95", "median"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-12, abs=1e-15)


# --- torchrun and the command line ----------------------------------------------------------------

ARGS = [
    "--dataset",
    "sinusoid",
    "--iterations",
    "600",
    "--meta-batch",
    "5",
    "--hidden",
    "8",
    "--val-every",
    "300",
    "--val-episodes",
    "7",
    "--checkpoint-every",
    "50",
    "--dtype",
    "float64",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=WORLD):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]


def run(command, timeout=300):
    return subprocess.run(
        command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The same run on two ranks (torchrun) and in one process (python cli.py train)."""
    tmp = tmp_path_factory.mktemp("cli")
    two = run(torchrun("cli.py", "train", *ARGS, "--out", str(tmp / "two")))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable, "cli.py", "train", *ARGS, "--out", str(tmp / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    return {"tmp": tmp, "two": two}


@pytest.mark.slow
def test_torchrun_trains_the_model_of_one_process(cli_runs):
    tmp = cli_runs["tmp"]
    two, one = (
        load_checkpoint(tmp / "two" / "latest.pt"),
        load_checkpoint(tmp / "one" / "latest.pt"),
    )
    assert two["iteration"] == one["iteration"] == 600
    assert_params_close(two["params"], one["params"], rtol=1e-10, atol=1e-12)
    assert torch.equal(two["generator"], one["generator"]), "the same tasks were drawn"
    output = cli_runs["two"].stdout + cli_runs["two"].stderr
    assert output.count("done: 600 iterations") == 1 and "ranks: 2 (backend gloo)" in output


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (a child of the launcher)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    for pid in children.read_text().split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def kill_rank_mid_run(run_dir: Path, *launcher_args, rank=1, after=150):
    """Start a torchrun job, SIGKILL one rank once a checkpoint past ``after`` exists."""
    launcher = subprocess.Popen(
        torchrun(*launcher_args, "cli.py", "train", *ARGS, "--out", str(run_dir)),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        latest = run_dir / "latest.pt"
        if latest.exists() and load_checkpoint(latest)["iteration"] >= after:
            break
        time.sleep(0.05)
    pid = _rank_pid(launcher, rank)
    assert pid is not None, "the worker to kill was not found"
    os.kill(pid, signal.SIGKILL)
    output, _ = launcher.communicate(timeout=120)
    return launcher.returncode, output


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers via /proc")
@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_loses_nothing(cli_runs):
    tmp = cli_runs["tmp"]
    code, output = kill_rank_mid_run(tmp / "killed")
    assert code != 0
    assert "rank      : 1 (local_rank: 1)" in output and "SIGKILL" in output, output[-3000:]
    assert "rank 0 of 2 stopped at iteration" in output
    assert f"--resume {tmp / 'killed'}" in output
    killed_at = load_checkpoint(tmp / "killed" / "latest.pt")["iteration"]
    assert 150 <= killed_at < 600, "the rank must be killed mid-way"
    resumed = run(torchrun("cli.py", "train", "--resume", str(tmp / "killed")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp / "killed" / "latest.pt"), load_checkpoint(tmp / "two" / "latest.pt")
    assert a["iteration"] == 600
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers via /proc")
@pytest.mark.slow
def test_an_elastic_restart_resumes_from_the_last_checkpoint(cli_runs):
    tmp = cli_runs["tmp"]
    code, output = kill_rank_mid_run(tmp / "restarted", "--max-restarts=1")
    assert code == 0, output[-3000:]
    assert "restart 1" in output and "done: 600 iterations" in output
    a = load_checkpoint(tmp / "restarted" / "latest.pt")
    b = load_checkpoint(tmp / "two" / "latest.pt")
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    rows = [
        json.loads(line) for line in (tmp / "restarted" / "metrics.jsonl").read_text().splitlines()
    ]
    train_rows = [r["iteration"] for r in rows if r["split"] == "train"]
    assert train_rows == list(range(10, 601, 10)), "no row lost or repeated"


@pytest.mark.slow
def test_torchrun_test_command_reports_the_single_process_numbers(cli_runs):
    checkpoint = str(cli_runs["tmp"] / "two")
    args = ["cli.py", "test", "--checkpoint", checkpoint, "--episodes", "9", "--json"]
    two = run(torchrun(*args))
    assert two.returncode == 0, two.stderr[-3000:]
    one = CliRunner().invoke(main, args[1:])
    assert one.exit_code == 0, one.output
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "rank 0 alone prints"
    a, b = json.loads(lines[0]), json.loads(one.output.splitlines()[-1])
    for k, per_step in b["results"].items():
        for step, values in per_step.items():
            for key, value in values.items():
                assert a["results"][k][step][key] == pytest.approx(value, rel=1e-12)


@pytest.mark.slow
def test_an_error_every_rank_meets_is_printed_once(tmp_path):
    result = run(torchrun("cli.py", "train", "--resume", str(tmp_path / "none")))
    assert result.returncode != 0
    assert result.stderr.count("latest.pt does not exist") == 1, result.stderr[-3000:]
