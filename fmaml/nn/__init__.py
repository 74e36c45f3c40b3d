"""Models for fmaml: the MAML paper's networks, ResNet-12 and an exact batch-statistics
BatchNorm."""

from fmaml.nn.batchnorm import BatchNorm, with_batch_statistics
from fmaml.nn.init import seeded
from fmaml.nn.models import Classifier, conv4, mlp
from fmaml.nn.resnet12 import resnet12

__all__ = ["BatchNorm", "Classifier", "conv4", "mlp", "resnet12", "seeded", "with_batch_statistics"]
