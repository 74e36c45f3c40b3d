"""Models for fmaml: the MAML paper's networks and an exact batch-statistics BatchNorm."""

from fmaml.nn.batchnorm import BatchNorm, with_batch_statistics
from fmaml.nn.models import Classifier, conv4, mlp

__all__ = ["BatchNorm", "Classifier", "conv4", "mlp", "with_batch_statistics"]
