"""zoo: plain, residual and batch-norm MLP/CNN builders, a registry and small data sets.

Models to study gradients on, and data to train them with offline:

- `build_mlp` and `build_cnn` build classifiers from blocks of one type (`BLOCKS`:
  `"plain"`, `"residual"`, `"batchnorm"`, `"residual_bn"`) with systematic layer names
  (`block3_dense`, `block3_bn`, `block3_act`, `block3_add`, ..., `head_dense`).
- `register_model`, `list_models`, `create_model` and `get_model_spec` name variants such
  as `mlp_residual_bn` or `cnn_plain`.
- `datasets.load("digits")` returns scikit-learn's bundled 8×8 digits, split and scaled.

Example:

>>> import zoo
>>> data = zoo.datasets.load("digits")
>>> model = zoo.create_model("mlp_residual_bn", depth=3)
>>> model.output_shape
(None, 10)
"""

from zoo import datasets
from zoo import variants as _variants  # noqa: F401  (registers the built-in variants)
from zoo.builders import BLOCKS
from zoo.builders import Block
from zoo.builders import build_cnn
from zoo.builders import build_mlp
from zoo.builders import default_initializer
from zoo.depth_sweep import depth_sweep
from zoo.depth_sweep import plot_depth_sweep
from zoo.registry import ModelSpec
from zoo.registry import create_model
from zoo.registry import get_model_spec
from zoo.registry import list_models
from zoo.registry import register_model
from zoo.tuning import HyperCNN
from zoo.tuning import HyperMLP
from zoo.tuning import tuner_results

__all__ = [
    "BLOCKS",
    "Block",
    "HyperCNN",
    "HyperMLP",
    "ModelSpec",
    "build_cnn",
    "build_mlp",
    "create_model",
    "datasets",
    "default_initializer",
    "depth_sweep",
    "get_model_spec",
    "list_models",
    "plot_depth_sweep",
    "register_model",
    "tuner_results",
]
