"""Model builders: MLPs and CNNs from plain, residual and batch-norm blocks."""

from zoo.builders._checks import BLOCKS
from zoo.builders._checks import Block
from zoo.builders._checks import default_initializer
from zoo.builders.cnn import build_cnn
from zoo.builders.mlp import build_mlp

__all__ = ["BLOCKS", "Block", "build_cnn", "build_mlp", "default_initializer"]
