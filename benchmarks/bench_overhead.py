"""Wall-time overhead of kgrad's callbacks against plain `model.fit`, side by side.

The model is the core issue's: a 20-layer, 128-wide ReLU MLP on 8,192 examples, batch
64, 3 epochs, on the CPU. Every configuration runs in this one process, in alternating
order, for several repetitions; each repetition's time is divided by the plain fit of
the same repetition, and the table reports medians.

Two times are measured per fit: the whole `fit()` call, and the steady state (epochs
after the first, which hold no tracing). Ratios of the steady state are the per-step
cost; ratios of the whole call include the one-off tracing.

Usage:

    python benchmarks/bench_overhead.py               # all configurations, 5 repetitions
    python benchmarks/bench_overhead.py --reps 3 --only plain logger naive
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kgrad  # noqa: E402

DEPTH, WIDTH, EXAMPLES, BATCH, EPOCHS, FEATURES, CLASSES = 20, 128, 8192, 64, 3, 64, 10


class NaiveTapeLogger(keras.callbacks.Callback):
    """The popular workaround: a second GradientTape on a probe batch, every step."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = tf.constant(x), tf.constant(y)
        self.norms = []

    def on_train_begin(self, logs=None):
        model = self.model

        @tf.function
        def norms():
            with tf.GradientTape() as tape:
                loss = model.compute_loss(x=self.x, y=self.y, y_pred=model(self.x))
            grads = tape.gradient(loss, model.trainable_variables)
            return tf.stack([tf.norm(g) for g in grads])

        self._norms = norms

    def on_train_batch_end(self, batch, logs=None):
        self.norms.append(self._norms().numpy())


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def build_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((FEATURES,))]
    layers += [keras.layers.Dense(WIDTH, activation="relu") for _ in range(DEPTH)]
    layers += [keras.layers.Dense(CLASSES)]
    return keras.Sequential(layers)


# name -> (callbacks factory, extra compile arguments)
Config = tuple[Callable[[np.ndarray, np.ndarray], list], dict]
CONFIGS: dict[str, Config] = {
    "plain": (lambda x, y: [], {}),
    "logger": (lambda x, y: [kgrad.GradientNormLogger()], {}),
    "naive": (lambda x, y: [NaiveTapeLogger(x[:BATCH], y[:BATCH])], {}),
    "global_clipnorm": (lambda x, y: [], {"optimizer": {"global_clipnorm": 1.0}}),
    "clip_global_norm": (lambda x, y: [kgrad.GradientClipping("global_norm", 1.0)], {}),
    "clip_agc": (lambda x, y: [kgrad.GradientClipping("agc")], {}),
    "monitor": (
        lambda x, y: [
            kgrad.GradientHealthMonitor(probe_data=x[:256], probe_every_n_steps=50, verbose=0)
        ],
        {},
    ),
}


def run_once(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    keras.backend.clear_session()
    make_callbacks, compile_kwargs = CONFIGS[name]
    model = build_model(seed)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, **compile_kwargs.get("optimizer", {})),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    timer = EpochTimer()
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        verbose=0,
        callbacks=make_callbacks(x, y) + [timer],
    )
    total = time.perf_counter() - start
    return total, sum(timer.seconds[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument(
        "--only", nargs="*", default=None, help=f"configurations: {list(CONFIGS)}"
    )
    args = parser.parse_args(argv)
    names = args.only or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown}; choose from {list(CONFIGS)}")
    if "plain" not in names:
        names = ["plain", *names]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=EXAMPLES)
    run_once("plain", x, y, seed=0)  # warm-up: imports, thread pools

    totals = {n: [] for n in names}
    steady = {n: [] for n in names}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            total, steady_seconds = run_once(name, x, y, seed=rep)
            totals[name].append(total)
            steady[name].append(steady_seconds)
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)

    print(
        f"\n{DEPTH}-layer {WIDTH}-wide ReLU MLP, {EXAMPLES} examples, batch {BATCH}, "
        f"{EPOCHS} epochs, {args.reps} repetitions, {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}\n"
    )
    header = f"{'configuration':<16}{'fit s':>8}{'fit ratio':>11}{'steady ratio':>14}"
    print(header)
    print("-" * len(header))
    for name in names:
        fit_ratio = statistics.median(
            t / p for t, p in zip(totals[name], totals["plain"])
        )
        steady_ratio = statistics.median(
            t / p for t, p in zip(steady[name], steady["plain"])
        )
        print(
            f"{name:<16}{statistics.median(totals[name]):>8.2f}"
            f"{fit_ratio:>11.3f}{steady_ratio:>14.3f}"
        )


if __name__ == "__main__":
    main()
