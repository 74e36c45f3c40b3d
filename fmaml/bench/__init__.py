"""The benchmark harness and the peers' adapters: how fast one meta-step runs.

:mod:`fmaml.bench.harness` times fmaml's strategies against learn2learn, higher and a plain
loop on the MAML paper's settings, after checking that every implementation gives the same
meta-gradient; ``python cli.py bench`` runs it, and the scripts in ``benchmarks/`` build on
its names, which are here too. It imports the engine and the core; nothing in the library
imports it but the ``bench`` command.
"""

from fmaml.bench.harness import (
    DEFAULT_IMPLS,
    IMPLS,
    ORDERS,
    PEERS,
    SETTINGS,
    Problem,
    Setting,
    build,
    chosen_strategy,
    count_flops,
    describe_device,
    gradient_check,
    interleaved_rates,
    make_step,
    measure,
    not_applicable,
    peer_missing,
    run_bench,
    run_json_job,
    strategy_of,
    time_steps,
    torch_batchnorm_twin,
)

__all__ = [
    "DEFAULT_IMPLS",
    "IMPLS",
    "ORDERS",
    "PEERS",
    "SETTINGS",
    "Problem",
    "Setting",
    "build",
    "chosen_strategy",
    "count_flops",
    "describe_device",
    "gradient_check",
    "interleaved_rates",
    "make_step",
    "measure",
    "not_applicable",
    "peer_missing",
    "run_bench",
    "run_json_job",
    "strategy_of",
    "time_steps",
    "torch_batchnorm_twin",
]
