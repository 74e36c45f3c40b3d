"""The execution engine: how a meta-batch runs, never what it computes.

:mod:`fmaml.engine.strategy` holds :class:`~fmaml.Strategy` (chunks of tasks, worker threads,
recomputed inner steps, compilation, torch's thread count), :func:`~fmaml.auto_strategy` (the
choice per device, model and cores), :func:`~fmaml.value_and_grad` and the runner behind
``fmaml.meta_loss(..., strategy=s)``. The top-level names ``fmaml.Strategy``,
``fmaml.auto_strategy``, ``fmaml.value_and_grad`` and ``fmaml.MetaGradients`` are the same
objects. The engine imports the core (:mod:`fmaml.objectives`, :mod:`fmaml.adapt`, ...); the
core never imports the engine.
"""
