"""The execution engine: how a meta-batch runs, never what it computes.

:mod:`fmaml.engine.strategy` holds :class:`~fmaml.Strategy` (chunks of tasks, worker threads,
recomputed inner steps, compilation, torch's thread count) and :func:`~fmaml.auto_strategy`
(the choice per device, model and cores); :mod:`fmaml.engine.run` holds
:func:`~fmaml.value_and_grad`, which runs a meta-batch under a strategy. The engine calls the
core (:mod:`fmaml.objectives`, :mod:`fmaml.adapt`); the core never calls the engine.
"""
