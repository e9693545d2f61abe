"""`HyperMLP` and `HyperCNN`: keras-tuner hypermodels over zoo's builders.

Each argument takes a fixed value, a list of choices, a `(min, max)` range or a
keras-tuner hyperparameter object (see `zoo.tuning.search_space`); training, gradient
health per trial and divergence handling are shared (see `zoo.tuning.base`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from zoo.builders.cnn import build_cnn
from zoo.builders.mlp import build_mlp
from zoo.tuning.base import BLOCK_RULES, ZooHyperModel, positive_int, space_arguments
from zoo.tuning.search_space import DEFAULT, Rule


class HyperMLP(ZooHyperModel):
    """A keras-tuner hypermodel of `zoo.build_mlp` classifiers.

    Every searchable argument takes a fixed value, a list of choices, a `(min, max)` range
    or a keras-tuner hyperparameter object; the defaults below form the default space.

    Args:
        input_shape: Shape of one example, e.g. `(64,)` for digits.
        num_classes: Number of classes, >= 2.
        depth: Hidden blocks. Defaults to `(2, 16)`: every integer from 2 to 16.
        width: Units per block. Defaults to `[16, 32, 64, 128]`; a range doubles.
        block: Block types. Defaults to all of `zoo.BLOCKS`.
        activation: Hidden activations. Defaults to `["relu", "gelu", "tanh", "sigmoid"]`.
        kernel_initializer: Defaults to `["auto", "glorot_uniform", "he_normal"]`.
        dropout: Defaults to `[0.0, 0.1, 0.2]`.
        l2: Defaults to `0.0` (fixed).
        learning_rate: Defaults to `(1e-4, 1e-1)`, log-uniform.
        batch_size: Defaults to `[32, 64, 128, 256]`; a range doubles; `None` leaves it
            to `search(batch_size=...)` or Keras.
        optimizer: One of `OPTIMIZERS`. Defaults to `"adam"` (fixed).
        clip_threshold: Global-norm clipping with `kgrad.GradientClipping`; 0 or None is
            off. Defaults to `None` (off, not a hyperparameter).
        warmup_epochs: Linear warm-up with `kgrad.LearningRateWarmup`; 0 or None is off.
            Defaults to `None`.
        name: The hypermodel's name. Defaults to `None`.
        tunable: keras-tuner's flag: whether the space may grow in `build`. Defaults to
            `True`.

    Raises:
        ValueError: For an impossible space: a range with min > max, an unknown block,
            activation, initializer or optimizer among the choices, a value out of range.

    Example:

    >>> hypermodel = HyperMLP((64,), 10, depth=(2, 8), block=["plain", "residual"],
    ...                       batch_size=[32, 128])
    >>> tuner = keras_tuner.RandomSearch(hypermodel, "val_accuracy", max_trials=4,
    ...                                  seed=7)  # doctest: +SKIP
    >>> tuner.search(x, y, validation_split=0.2, epochs=3)  # doctest: +SKIP
    >>> zoo.tuner_results(tuner)  # doctest: +SKIP
    """

    ARCHITECTURE_RULES = {
        "depth": Rule(positive_int("depth"), "int", (2, 16)),
        "width": Rule(positive_int("width"), "int_doubling", [16, 32, 64, 128]),
        **BLOCK_RULES,
    }

    def __init__(self, input_shape: Sequence[int], num_classes: int, *,
                 depth: Any = DEFAULT, width: Any = DEFAULT, block: Any = DEFAULT,
                 activation: Any = DEFAULT, kernel_initializer: Any = DEFAULT,
                 dropout: Any = DEFAULT, l2: Any = DEFAULT, learning_rate: Any = DEFAULT,
                 batch_size: Any = DEFAULT, optimizer: Any = DEFAULT,
                 clip_threshold: Any = DEFAULT, warmup_epochs: Any = DEFAULT,
                 name: str | None = None, tunable: bool = True):
        super().__init__(input_shape, num_classes, space_arguments(locals()), name=name,
                         tunable=tunable)

    def build_model(self, values: dict[str, Any]) -> keras.Model:
        return build_mlp(
            self.input_shape, self.num_classes, depth=values["depth"],
            width=values["width"], block=values["block"], activation=values["activation"],
            kernel_initializer=values["kernel_initializer"], dropout=values["dropout"],
            l2=values["l2"],
        )


class HyperCNN(ZooHyperModel):
    """A keras-tuner hypermodel of `zoo.build_cnn` classifiers.

    Stage `s` (0-based) has `filters * 2**s` channels; the other arguments are as in
    `HyperMLP`, and take the same kinds of values.

    Args:
        input_shape: `(height, width, channels)`, e.g. `(8, 8, 1)` for digits as images.
        num_classes: Number of classes, >= 2.
        stages: Number of stages. Defaults to `2` (fixed).
        filters: Channels of the first stage. Defaults to `[8, 16, 32]`.
        blocks_per_stage: Blocks in every stage. Defaults to `(1, 3)`.
        kernel_size: Defaults to `3` (fixed).
        block, activation, kernel_initializer, dropout, l2, learning_rate, batch_size,
        optimizer, clip_threshold, warmup_epochs, name, tunable: As in `HyperMLP`.

    Raises:
        ValueError: For an impossible space, as `HyperMLP`, or an `input_shape` that is
            not an image shape.

    Example:

    >>> hypermodel = HyperCNN((8, 8, 1), 10, blocks_per_stage=(1, 2), filters=8)
    >>> sorted(hypermodel.space.dimensions)[:3]
    ['activation', 'batch_size', 'block']
    """

    INPUT_RANK = 3
    ARCHITECTURE_RULES = {
        "stages": Rule(positive_int("stages"), "int", 2),
        "filters": Rule(positive_int("filters"), "int_doubling", [8, 16, 32]),
        "blocks_per_stage": Rule(positive_int("blocks_per_stage"), "int", (1, 3)),
        "kernel_size": Rule(positive_int("kernel_size"), "int", 3),
        **BLOCK_RULES,
    }

    def __init__(self, input_shape: Sequence[int], num_classes: int, *,
                 stages: Any = DEFAULT, filters: Any = DEFAULT,
                 blocks_per_stage: Any = DEFAULT, kernel_size: Any = DEFAULT,
                 block: Any = DEFAULT, activation: Any = DEFAULT,
                 kernel_initializer: Any = DEFAULT, dropout: Any = DEFAULT,
                 l2: Any = DEFAULT, learning_rate: Any = DEFAULT, batch_size: Any = DEFAULT,
                 optimizer: Any = DEFAULT, clip_threshold: Any = DEFAULT,
                 warmup_epochs: Any = DEFAULT, name: str | None = None,
                 tunable: bool = True):
        super().__init__(input_shape, num_classes, space_arguments(locals()), name=name,
                         tunable=tunable)

    def build_model(self, values: dict[str, Any]) -> keras.Model:
        return build_cnn(
            self.input_shape, self.num_classes,
            filters=[values["filters"] * 2**stage for stage in range(values["stages"])],
            blocks_per_stage=values["blocks_per_stage"], kernel_size=values["kernel_size"],
            block=values["block"], activation=values["activation"],
            kernel_initializer=values["kernel_initializer"], dropout=values["dropout"],
            l2=values["l2"],
        )
