"""The models the overhead benchmark trains, with synthetic inputs of their shapes.

- `mlp`: the core issue's 20-layer, 128-wide ReLU MLP (64 features, 10 classes, batch
  64), the worst case for a per-step cost (a ~1 ms step);
- `resnet`: a CIFAR-shaped ResNet-20 (32×32×3 inputs, 19 convolutions with batch norm in
  three stages of 16, 32 and 64 channels, identity and 1×1 projection shortcuts, a dense
  head; He et al. 2016), batch 128;
- `transformer`: a text classifier, token and position embeddings (vocabulary 8,000,
  width 128), 2 post-norm encoder blocks (4 heads of 32, feed-forward 256), sequence
  length 128, average pooling, 2 classes, batch 64;
- `lstm`: a bidirectional LSTM classifier, embeddings (vocabulary 8,000, width 64),
  `Bidirectional(LSTM(64))`, sequence length 128, 2 classes, batch 64.

No downloads: inputs are random (normal features and images, uniform token ids) and so
are the labels; the costs per step do not depend on what the data mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model to benchmark, its inputs and how it is trained.

    Attributes:
        name: The `--model` name.
        description: One line for the table's heading.
        build: Returns the (uncompiled) model, from a seed.
        inputs: Returns `(x, y)` of `examples` examples from a NumPy generator.
        batch: The batch size.
        examples: Examples per epoch (a round of the per-step measurement is one epoch).
        classes: The number of classes (integer labels, logits out).
    """

    name: str
    description: str
    build: Callable[[int], keras.Model]
    inputs: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    batch: int
    examples: int
    classes: int

    def data(self, examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The synthetic `(x, y)`, the same for every call."""
        return self.inputs(np.random.default_rng(0), examples or self.examples)


def _labels(rng: np.random.Generator, examples: int, classes: int) -> np.ndarray:
    return rng.integers(0, classes, size=examples)


# -- mlp ------------------------------------------------------------------------------

MLP_DEPTH, MLP_WIDTH, MLP_FEATURES = 20, 128, 64


def build_mlp(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((MLP_FEATURES,))]
    layers += [keras.layers.Dense(MLP_WIDTH, activation="relu") for _ in range(MLP_DEPTH)]
    layers += [keras.layers.Dense(10)]
    return keras.Sequential(layers)


def mlp_inputs(rng: np.random.Generator, examples: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(examples, MLP_FEATURES)).astype("float32")
    return x, _labels(rng, examples, 10)


# -- resnet ---------------------------------------------------------------------------


def _conv_bn(x, filters: int, strides: int = 1, relu: bool = True):
    x = keras.layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal",
    )(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.ReLU()(x) if relu else x


def build_resnet(seed: int, blocks_per_stage: int = 3) -> keras.Model:
    """ResNet-20 for 32×32×3 inputs: 1 + 3·3·2 = 19 convolutions and a dense layer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = _conv_bn(inputs, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = _conv_bn(x, filters, strides)
            y = _conv_bn(y, filters, relu=False)
            if strides != 1:
                shortcut = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x)
                shortcut = keras.layers.BatchNormalization()(shortcut)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="resnet20")


def resnet_inputs(rng: np.random.Generator, examples: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(examples, 32, 32, 3)).astype("float32")
    return x, _labels(rng, examples, 10)


# -- transformer ----------------------------------------------------------------------

VOCABULARY, SEQUENCE = 8000, 128


class TokenAndPosition(keras.layers.Layer):
    """Token embeddings plus learned position embeddings."""

    def __init__(self, vocabulary: int, length: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocabulary, width)
        self.positions = keras.layers.Embedding(length, width)

    def call(self, ids):
        positions = keras.ops.arange(keras.ops.shape(ids)[-1])
        return self.tokens(ids) + self.positions(positions)


def _encoder_block(x, width: int, heads: int, hidden: int):
    attention = keras.layers.MultiHeadAttention(heads, width // heads)(x, x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x + attention)
    feed = keras.layers.Dense(hidden, activation="relu")(x)
    feed = keras.layers.Dense(width)(feed)
    return keras.layers.LayerNormalization(epsilon=1e-6)(x + feed)


def build_transformer(seed: int, width: int = 128, blocks: int = 2) -> keras.Model:
    keras.utils.set_random_seed(seed)
    ids = keras.Input((SEQUENCE,), dtype="int32")
    x = TokenAndPosition(VOCABULARY, SEQUENCE, width)(ids)
    for _ in range(blocks):
        x = _encoder_block(x, width, heads=4, hidden=2 * width)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, keras.layers.Dense(2)(x), name="transformer")


def token_inputs(rng: np.random.Generator, examples: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(1, VOCABULARY, size=(examples, SEQUENCE)).astype("int32")
    return x, _labels(rng, examples, 2)


# -- lstm -----------------------------------------------------------------------------


def build_lstm(seed: int, width: int = 64) -> keras.Model:
    keras.utils.set_random_seed(seed)
    ids = keras.Input((SEQUENCE,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, width)(ids)
    x = keras.layers.Bidirectional(keras.layers.LSTM(width))(x)
    return keras.Model(ids, keras.layers.Dense(2)(x), name="bilstm")


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload(
        "mlp",
        f"{MLP_DEPTH}-layer {MLP_WIDTH}-wide ReLU MLP, batch 64",
        build_mlp, mlp_inputs, batch=64, examples=8192, classes=10,
    ),
    "resnet": Workload(
        "resnet",
        "ResNet-20 (32x32x3, 19 conv + BN, skip connections), batch 128",
        build_resnet, resnet_inputs, batch=128, examples=1024, classes=10,
    ),
    "transformer": Workload(
        "transformer",
        f"transformer classifier (2 blocks, width 128, sequence {SEQUENCE}), batch 64",
        build_transformer, token_inputs, batch=64, examples=1024, classes=2,
    ),
    "lstm": Workload(
        "lstm",
        f"bidirectional LSTM classifier (64 units, sequence {SEQUENCE}), batch 64",
        build_lstm, token_inputs, batch=64, examples=1024, classes=2,
    ),
}
