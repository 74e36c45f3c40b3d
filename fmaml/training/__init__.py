"""The training shell: configuration, problems, the training loop, checkpoints, distributed
training, plots and the command line.

- :mod:`fmaml.training.config`: :class:`~fmaml.training.config.TrainConfig`, every setting of
  a run (each field is also a ``train`` option); :mod:`fmaml.training.presets`: named ones.
- :mod:`fmaml.training.problems`, :mod:`fmaml.training.image_problems`: a config's data,
  model and samplers.
- :mod:`fmaml.training.train`: the training loop (``fmaml.fit``), evaluation and resuming;
  :mod:`fmaml.training.checkpoint`: run folders and checkpoints;
  :mod:`fmaml.training.distributed`: ranks under ``torchrun``.
- :mod:`fmaml.training.run`: a trained run to adapt and predict with (``fmaml.load_run``).
- :mod:`fmaml.training.plot`: the training curves; :mod:`fmaml.training.cli`: the ``fmaml``
  command (``python cli.py``).

The shell imports the engine (:mod:`fmaml.engine`) and the core; neither imports it. Importing
this package loads none of its modules: each loads when first imported (``fmaml.TrainConfig``,
``fmaml.fit``, ... load theirs on first use).
"""
