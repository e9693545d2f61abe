"""`depth_sweep`: train every block type at several depths and see which ones still learn.

The headline of the field in one call: a plain sigmoid MLP trains worse the deeper it is
(σ′ ≤ 1/4 shrinks the backpropagated signal at every layer), while batch norm or
pre-activation skip connections keep deep nets trainable (He et al. 2016: plain-56 has a
higher *training* error than plain-20; Ioffe & Szegedy 2015: batch norm makes sigmoid nets
trainable).

Two choices shape what the sweep shows:

- Residual blocks default to `preactivation=True` (`x + Dense(σ(x))`): the original
  post-activation block passes the sum through the activation, `σ(x + Dense(x))`, so a
  sigmoid net still loses σ′ ≤ 1/4 per block and fails like a plain one.
- `plot_depth_sweep` plots training accuracy by default. Batch norm's moving statistics
  (momentum 0.99) need a few hundred steps to settle, so on short runs the validation
  accuracy of batch-norm nets (computed with those statistics) is near chance even when
  they train well; the frame holds both.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

import keras
import pandas as pd

import kgrad
from zoo import datasets
from zoo.builders import _checks
from zoo.builders.mlp import build_mlp
from zoo.tuning.base import OPTIMIZERS
from zoo.tuning.trial_health import gradient_health

COLUMNS: tuple[str, ...] = (
    "block", "depth", "width", "batch_size", "seed", "activation", "preactivation",
    "train_accuracy", "val_accuracy", "train_loss", "val_loss", "grad_first_to_last",
    "grad_decay_per_layer", "vanishing", "exploding", "seconds",
)


def _check_each(values: Any, name: str, check) -> list:
    if isinstance(values, (str, int)) or not isinstance(values, Sequence) or not values:
        raise ValueError(
            f"`{name}` must be a non-empty list or tuple. Received: {name}={values!r}"
        )
    return [check(value) for value in values]


def depth_sweep(
    blocks: Sequence[str] = ("plain", "residual", "batchnorm"),
    depths: Sequence[int] = (2, 8, 16),
    *,
    widths: Sequence[int] = (32,),
    batch_sizes: Sequence[int] = (64,),
    seeds: Sequence[int] = (1, 2),
    data: str | datasets.Dataset = "digits",
    activation: str = "sigmoid",
    preactivation: bool = True,
    epochs: int = 5,
    learning_rate: float = 1e-2,
    optimizer: str = "adam",
    verbose: int = 1,
    plot: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, Any]:
    """Trains an MLP for every block, depth, width, batch size and seed; one row per run.

    Each run seeds Keras with its seed, builds `zoo.build_mlp(..., block, depth, width,
    activation)`, trains it on the training split with the test split as validation
    data and a `kgrad.GradientNormLogger` attached.

    Args:
        blocks: Block types, from `zoo.BLOCKS`. Defaults to `("plain", "residual",
            "batchnorm")`.
        depths: Numbers of hidden blocks. Defaults to `(2, 8, 16)`.
        widths: Units per block. Defaults to `(32,)`.
        batch_sizes: Defaults to `(64,)`.
        seeds: One run per seed (weights and shuffling); use nonzero seeds. Defaults to
            `(1, 2)`.
        data: A `zoo.datasets.load` name or a `Dataset`. Defaults to `"digits"`.
        activation: The hidden activation. Defaults to `"sigmoid"`.
        preactivation: Use pre-activation residual blocks (see the module docstring);
            applies to `residual` and `residual_bn` only. Defaults to `True`.
        epochs: Epochs per run. Defaults to `5`.
        learning_rate: Defaults to `1e-2`.
        optimizer: One of `zoo.tuning.base.OPTIMIZERS`. Defaults to `"adam"`.
        verbose: `1` prints one line per run with the accuracies and an ETA. Defaults
            to `1`.
        plot: Also return `plot_depth_sweep(frame)`. Defaults to `False`.

    Returns:
        A DataFrame with the columns `COLUMNS` (accuracy and loss of the final epoch; the
        gradient health of `zoo.tuning.trial_health.gradient_health`), or
        `(frame, figure)` with `plot=True`.

    Raises:
        ValueError: If a list is empty, a block, activation, optimizer or data set is
            unknown, or a number is out of range.

    Example:

    >>> frame = depth_sweep(depths=(2, 10), epochs=3)  # doctest: +SKIP
    >>> frame.groupby(["block", "depth"]).train_accuracy.mean()  # doctest: +SKIP
    """
    blocks = _check_each(
        blocks, "blocks", lambda b: _checks.check_choice(b, "block", _checks.BLOCKS)
    )
    depths = _check_each(depths, "depths", lambda v: _checks.check_int(v, "depths"))
    widths = _check_each(widths, "widths", lambda v: _checks.check_int(v, "widths"))
    batch_sizes = _check_each(
        batch_sizes, "batch_sizes", lambda v: _checks.check_int(v, "batch_sizes")
    )
    seeds = _check_each(seeds, "seeds", lambda v: _checks.check_int(v, "seeds", minimum=0))
    _checks.check_activation(activation)
    _checks.check_choice(optimizer, "optimizer", OPTIMIZERS)
    epochs = _checks.check_int(epochs, "epochs")
    if not _checks.is_real_in(learning_rate, 0.0, math.inf, include_low=False):
        raise ValueError(
            f"`learning_rate` must be a float > 0. Received: learning_rate={learning_rate!r}"
        )
    dataset = datasets.load(data) if isinstance(data, str) else data

    runs = list(itertools.product(blocks, depths, widths, batch_sizes, seeds))
    rows, started = [], time.perf_counter()
    for index, (block, depth, width, batch_size, seed) in enumerate(runs, start=1):
        row = _train_one(dataset, block, depth, width, batch_size, seed, activation,
                         preactivation and block in _checks.RESIDUAL_BLOCKS, epochs,
                         learning_rate, optimizer)
        rows.append(row)
        if verbose:
            elapsed = time.perf_counter() - started
            eta = elapsed / index * (len(runs) - index)
            print(
                f"[{index}/{len(runs)}] {block} depth={depth} width={width} "
                f"batch={batch_size} seed={seed}: train acc {row['train_accuracy']:.3f}, "
                f"val acc {row['val_accuracy']:.3f} ({row['seconds']:.1f} s, "
                f"ETA {eta:.0f} s)",
                flush=True,
            )
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return (frame, plot_depth_sweep(frame)) if plot else frame


def _train_one(dataset, block, depth, width, batch_size, seed, activation, preactivation,
               epochs, learning_rate, optimizer) -> dict[str, Any]:
    started = time.perf_counter()
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(seed)
    model = build_mlp(dataset.input_shape, dataset.num_classes, depth=depth, width=width,
                      block=block, activation=activation, preactivation=preactivation)
    model.compile(
        optimizer=keras.optimizers.get(
            {"class_name": optimizer, "config": {"learning_rate": learning_rate}}
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    logger = kgrad.GradientNormLogger()
    history = model.fit(dataset.x_train, dataset.y_train,
                        validation_data=(dataset.x_test, dataset.y_test), epochs=epochs,
                        batch_size=batch_size, verbose=0, callbacks=[logger]).history
    health = gradient_health(logger.records)
    return {
        "block": block, "depth": depth, "width": width, "batch_size": batch_size,
        "seed": seed, "activation": activation, "preactivation": preactivation,
        "train_accuracy": history["accuracy"][-1], "val_accuracy": history["val_accuracy"][-1],
        "train_loss": history["loss"][-1], "val_loss": history["val_loss"][-1],
        **health, "seconds": time.perf_counter() - started,
    }


def plot_depth_sweep(frame: pd.DataFrame, metric: str = "train_accuracy", ax=None):
    """Plots a metric against depth, one line per block type: mean over seeds, min–max band.

    When the frame holds several widths, batch sizes or activations, each combination gets
    its own line.

    Args:
        frame: The DataFrame of `depth_sweep`.
        metric: The column to plot. Defaults to `"train_accuracy"` (see the module
            docstring for why not validation accuracy).
        ax: A matplotlib Axes to draw on. Defaults to `None`, a new figure.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: If `frame` lacks `block`, `depth` or `metric`.

    Example:

    >>> figure = plot_depth_sweep(frame, metric="val_accuracy")  # doctest: +SKIP
    """
    missing = [c for c in ("block", "depth", metric) if c not in frame]
    if missing:
        raise ValueError(
            f"The frame lacks the columns {missing}; pass the DataFrame of `depth_sweep` "
            f"and a metric among its columns. Received columns: {list(frame.columns)}"
        )
    import matplotlib.pyplot as plt

    if ax is None:
        figure, ax = plt.subplots(figsize=(6, 4))
    else:
        figure = ax.figure
    extra = [
        c for c in ("width", "batch_size", "activation") if c in frame and frame[c].nunique() > 1
    ]
    for key, group in frame.groupby(["block", *extra], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        label = key[0] + "".join(f", {name}={value}" for name, value in zip(extra, key[1:]))
        stats = group.groupby("depth")[metric].agg(["mean", "min", "max"]).sort_index()
        line, = ax.plot(stats.index, stats["mean"], marker="o", label=label)
        ax.fill_between(stats.index, stats["min"], stats["max"], color=line.get_color(),
                        alpha=0.2)
    ax.set_xlabel("depth (hidden blocks)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{metric.replace('_', ' ')} against depth (mean and min–max over seeds)")
    ax.legend(title="block")
    return figure
