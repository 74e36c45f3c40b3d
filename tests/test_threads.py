"""No global side effects: threads calling the library at once (issue 11).

torch's intra-op thread count and the warning filters are process-wide; a strategy changes
them only within a meta-batch, and meta-batches of different threads that do so take turns.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from conftest_tasks import small_conv_problem as setup

import fmaml
from fmaml.engine.run import intra_op_threads

DTYPE = torch.float64


def meta_gradient(loss_fn, params, tasks, strategy):
    loss, grads = fmaml.value_and_grad(
        loss_fn, params, tasks, fmaml.InnerLoop(0.1), strategy=strategy
    )
    return [loss, *(grads.params[k] for k in params)]


def test_threads_calling_meta_loss_at_once_get_the_serial_results_and_leave_no_trace():
    loss_fn, params, tasks = setup()
    strategies = [
        fmaml.Strategy(chunk_size=1, threads=1),
        fmaml.Strategy(chunk_size=2, threads=2),
        fmaml.Strategy(chunk_size=1, workers=2),
        None,
    ]
    expected = [meta_gradient(loss_fn, params, tasks, s) for s in strategies]
    threads_before, filters_before = torch.get_num_threads(), list(warnings.filters)
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(
            pool.map(lambda i: meta_gradient(loss_fn, params, tasks, strategies[i % 4]), range(12))
        )
    for i, result in enumerate(got):
        for a, b in zip(result, expected[i % 4], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.get_num_threads() == threads_before
    assert warnings.filters == filters_before


def test_a_thread_count_scope_waits_for_another_threads_scope():
    before = torch.get_num_threads()
    inside, release, seen = threading.Event(), threading.Event(), []

    def first():
        with intra_op_threads(1):
            inside.set()
            release.wait(timeout=30)
            seen.append(("first", torch.get_num_threads()))

    def second():
        inside.wait(timeout=30)
        with intra_op_threads(before + 1):
            seen.append(("second", torch.get_num_threads()))

    a, b = threading.Thread(target=first), threading.Thread(target=second)
    a.start(), b.start()
    inside.wait(timeout=30)
    b.join(timeout=0.5)
    assert b.is_alive() and seen == [], "the second scope waits while the first is open"
    release.set()
    a.join(timeout=30), b.join(timeout=30)
    assert seen == [("first", 1), ("second", before + 1)]
    assert torch.get_num_threads() == before


def test_scopes_nest_within_a_thread_and_restore_the_count_found_on_entry():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        with intra_op_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with intra_op_threads(None):
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
