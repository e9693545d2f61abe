"""The hypermodels' search space: defaults, the four ways to give an argument, bad spaces."""

from __future__ import annotations

import warnings

import keras
import keras_tuner
import pytest

import zoo
from zoo.tuning.search_space import DEFAULT

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

hp_types = keras_tuner.engine.hyperparameters


def _space(hypermodel) -> dict[str, object]:
    hp = keras_tuner.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    return {entry.name: entry for entry in hp.space}


def test_hyper_mlp_default_space():
    space = _space(zoo.HyperMLP((64,), 10))

    assert list(space) == [
        "depth", "width", "block", "activation", "kernel_initializer", "dropout", "l2",
        "learning_rate", "batch_size", "optimizer",
    ]  # clip_threshold and warmup_epochs are off (None), so not hyperparameters
    assert (space["depth"].min_value, space["depth"].max_value, space["depth"].step) == (
        2, 16, 1
    )
    assert space["width"].values == [16, 32, 64, 128]
    assert space["block"].values == list(zoo.BLOCKS)
    assert space["activation"].values == ["relu", "gelu", "tanh", "sigmoid"]
    assert space["kernel_initializer"].values == ["auto", "glorot_uniform", "he_normal"]
    assert space["dropout"].values == [0.0, 0.1, 0.2]
    assert isinstance(space["l2"], hp_types.Fixed) and space["l2"].value == 0.0
    lr = space["learning_rate"]
    assert (lr.min_value, lr.max_value, lr.sampling) == (1e-4, 1e-1, "log")
    assert space["batch_size"].values == [32, 64, 128, 256]
    assert space["optimizer"].value == "adam"


def test_hyper_cnn_default_space_and_build():
    hypermodel = zoo.HyperCNN((8, 8, 1), 10)
    space = _space(hypermodel)
    assert space["stages"].value == 2
    assert space["filters"].values == [8, 16, 32]
    assert (space["blocks_per_stage"].min_value, space["blocks_per_stage"].max_value) == (1, 3)
    assert space["kernel_size"].value == 3

    hp = keras_tuner.HyperParameters()
    hp.values.update(filters=8, blocks_per_stage=2, block="residual", learning_rate=0.01)
    model = hypermodel.build(hp)

    convs = [layer for layer in model.layers if layer.name.endswith("_conv")]
    assert [layer.filters for layer in convs] == [8, 8, 16, 16]  # doubled per stage
    assert model.optimizer.learning_rate.numpy() == pytest.approx(0.01)


def test_arguments_as_fixed_value_choices_range_and_hyperparameter_object():
    depth = hp_types.Int("n_blocks", 1, 3)
    hypermodel = zoo.HyperMLP(
        (64,), 10, depth=depth, width=(8, 64), block="residual",
        activation=["relu", "tanh"], batch_size=(16, 128),
        kernel_initializer=keras.initializers.Orthogonal(),
    )
    space = _space(hypermodel)

    assert "n_blocks" in space and "depth" not in space  # the object keeps its name
    assert list(space["width"].values) == [8, 16, 32, 64]  # a range of widths doubles
    assert list(space["batch_size"].values) == [16, 32, 64, 128]
    assert isinstance(space["block"], hp_types.Fixed)
    assert space["activation"].values == ["relu", "tanh"]
    assert "kernel_initializer" not in space  # an initializer object is a constant

    hp = keras_tuner.HyperParameters()
    hp.values.update(n_blocks=3, width=8)
    model = hypermodel.build(hp)
    assert [layer.name for layer in model.layers if layer.name.endswith("_dense")] == [
        "block1_dense", "block2_dense", "block3_dense", "head_dense",
    ]
    assert isinstance(model.get_layer("block1_dense").kernel_initializer,
                      keras.initializers.Orthogonal)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"depth": (16, 2)}, r"`depth` as a range must be \(min, max\) with min <= max\. "
                             r"Received: depth=\(16, 2\)"),
        ({"block": ["plain", "resnet"]},
         r"`block` must be one of 'plain', 'residual', 'batchnorm', 'residual_bn'\. "
         r"Received: block='resnet' \(in the search space block=\['plain', 'resnet'\]\)"),
        ({"activation": ["relu", "sigmoidd"]}, r"`activation` must be the name of a Keras "
                                               r"activation.*Received: activation='sigmoidd'"),
        ({"block": hp_types.Choice("blocks", ["plain", "dense"])}, r"Received: block='dense'"),
        ({"depth": hp_types.Int("depth", 0, 4)}, r"`depth` must be an integer >= 1"),
        ({"learning_rate": (0.0, 0.1)}, r"`learning_rate` must be a float > 0"),
        ({"optimizer": "adamm"}, r"`optimizer` must be one of 'adam'.*Received: "
                                 r"optimizer='adamm'"),
        ({"width": []}, r"`width` must be a value, a non-empty list"),
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1"),
        ({"clip_threshold": -1.0}, r"`clip_threshold` must be None or a float >= 0"),
    ],
)
def test_impossible_space_fails_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        zoo.HyperMLP((64,), 10, **arguments)


def test_hyper_cnn_rejects_a_vector_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        zoo.HyperCNN((64,), 10)


def test_search_batch_size_is_ignored_with_one_warning_unless_the_hypermodel_leaves_it():
    hypermodel = zoo.HyperMLP((64,), 10, batch_size=[32, 64])
    with pytest.warns(UserWarning, match=r"`batch_size=17` passed to `search\(\)` is ignored"):
        assert hypermodel._batch_size(64, 17) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hypermodel._batch_size(32, 17) == 32  # warned once only
    assert zoo.HyperMLP((64,), 10, batch_size=None)._batch_size(None, 17) == 17
    assert DEFAULT is not None and repr(DEFAULT) == "DEFAULT"
