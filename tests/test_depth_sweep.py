"""The depth sweep on digits: plain sigmoid nets stop training with depth, others do not."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import zoo  # noqa: E402
from zoo.depth_sweep import COLUMNS  # noqa: E402

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


@pytest.mark.slow_on("torch", reason="trains nine models eagerly, 140 s on 2 CPU cores; "
                     "the zoo's builders and searches run on torch by default")
def test_plain_sigmoid_loses_accuracy_with_depth_while_residual_and_batchnorm_do_not(capsys):
    # Settings checked over seeds 1-3 (Adam 1e-2, 3 epochs, width 32): training accuracy
    # plain 0.74-0.80 at depth 2 and 0.08-0.10 at depth 10; residual (pre-activation)
    # 0.83-0.87 and 0.73-0.85; batchnorm 0.95-0.96 and 0.90-0.94.
    frame, figure = zoo.depth_sweep(depths=(2, 10), seeds=(1, 2), epochs=3, plot=True)

    assert list(frame.columns) == list(COLUMNS) and len(frame) == 3 * 2 * 2
    accuracy = frame.pivot_table(index=["block", "seed"], columns="depth",
                                 values="train_accuracy")
    drop = accuracy[2] - accuracy[10]
    assert (accuracy.loc["plain", 10] < 0.3).all() and (drop["plain"] > 0.4).all()
    for block in ("residual", "batchnorm"):
        assert (accuracy.loc[block, 10] > 0.6).all()
        assert (drop[block] < 0.25).all()
    # The gradients say why: the deep plain sigmoid net's first layer gets almost nothing.
    deep = frame[frame.depth == 10].set_index(["block", "seed"])
    assert (deep.loc["plain"].grad_first_to_last < 1e-3).all()
    assert (deep.loc["plain"].vanishing == 1.0).all()
    assert (deep.loc["residual"].grad_first_to_last > 1e-2).all()
    assert frame.preactivation.tolist() == [b == "residual" for b in frame.block]

    output = capsys.readouterr().out
    assert "[12/12] batchnorm depth=10" in output and "ETA" in output
    axis = figure.axes[0]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == [
        "plain", "residual", "batchnorm"
    ]
    np.testing.assert_allclose(axis.lines[0].get_ydata(),
                               accuracy.loc["plain"].mean().to_numpy())


def test_plot_depth_sweep_draws_one_line_per_block_and_width():
    frame = pd.DataFrame({
        "block": ["plain"] * 4, "depth": [2, 2, 8, 8], "width": [16, 32, 16, 32],
        "train_accuracy": [0.9, 0.8, 0.2, 0.3],
    })
    figure = zoo.plot_depth_sweep(frame)
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == ["plain, width=16", "plain, width=32"]
    with pytest.raises(ValueError, match=r"lacks the columns \['val_loss'\]"):
        zoo.plot_depth_sweep(frame, metric="val_loss")


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"blocks": ("plain", "resnet")}, r"`block` must be one of .*Received: block='resnet'"),
        ({"depths": ()}, r"`depths` must be a non-empty list"),
        ({"depths": (2, 0)}, r"`depths` must be an integer >= 1"),
        ({"activation": "sigmoidd"}, r"`activation` must be the name of a Keras activation"),
        ({"learning_rate": -1.0}, r"`learning_rate` must be a float > 0"),
        ({"data": "imagenet"}, r"Unknown data set"),
    ],
)
def test_bad_sweep_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        zoo.depth_sweep(**arguments)
