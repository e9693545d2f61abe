"""zoo: plain, residual and batch-norm MLP/CNN builders, a registry and small data sets.

`build_mlp` and `build_cnn` build classifiers from blocks of one type (`BLOCKS`: `"plain"`,
`"residual"`, `"batchnorm"`, `"residual_bn"`) with systematic layer names (`block3_dense`,
`block3_bn`, `block3_act`, `block3_add`, ..., `head_dense`).
"""

from zoo.builders import BLOCKS
from zoo.builders import Block
from zoo.builders import build_cnn
from zoo.builders import build_mlp
from zoo.builders import default_initializer

__all__ = ["BLOCKS", "Block", "build_cnn", "build_mlp", "default_initializer"]
