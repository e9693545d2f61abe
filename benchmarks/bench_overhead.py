"""Wall-time overhead of kgrad's callbacks against plain `model.fit`, side by side.

The model is the core issue's: a 20-layer, 128-wide ReLU MLP on 8,192 examples, batch
64, 3 epochs, on the CPU. Every configuration runs in this one process, in alternating
order, for several repetitions; each repetition's time is divided by the plain fit of
the same repetition, and the table reports medians.

Three times are measured:

- `fit`: the whole `fit()` call, tracing included (on this model the one-off trace of the
  train function is most of a 3-epoch fit on 2 CPUs);
- `steady`: the epochs after the first inside that same fit (no tracing);
- `per step`: a longer measurement of the per-step cost with no tracing at all. Every
  configuration's train function is traced on one shared model (same variables,
  optimizer and input pipeline: two separate models of one configuration differ by up to
  ±5% per step, where TensorFlow happens to place their buffers); then rounds of one
  epoch (128 steps, with the callbacks' batch and epoch hooks called as `fit` calls
  them, each configuration counting its own steps) alternate between the
  configurations, on `--instances` shared models. This is
  the figure the per-step targets are about; it is given in wall time and in CPU time
  of the process.

Usage:

    python benchmarks/bench_overhead.py               # all configurations, 5 repetitions
    python benchmarks/bench_overhead.py --reps 3 --only plain logger naive
    python benchmarks/bench_overhead.py --rounds 0     # skip the per-step measurement
    python benchmarks/bench_overhead.py --processes 3  # medians and ranges over 3 fresh
                                                       # processes (placement varies)
    python benchmarks/bench_overhead.py --only plain_xla logger_xla  # under XLA, each
                                                       # against the plain XLA fit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kgrad  # noqa: E402
from kgrad.capture.step_hook import StepHook  # noqa: E402

DEPTH, WIDTH, EXAMPLES, BATCH, EPOCHS, FEATURES, CLASSES = 20, 128, 8192, 64, 3, 64, 10

# The benchmark model has dead units: the monitor's findings are not the point here.
warnings.simplefilter("ignore", kgrad.GradientHealthWarning)


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


# name -> (callbacks factory, extra compile arguments). A configuration compiled with
# `jit_compile=True` is compared with `plain_xla`, every other one with `plain`.
Config = tuple[Callable[[np.ndarray, np.ndarray], list], dict]
CONFIGS: dict[str, Config] = {
    "plain": (lambda x, y: [], {}),
    "logger": (lambda x, y: [kgrad.GradientNormLogger()], {}),
    "logger_every_10": (lambda x, y: [kgrad.GradientNormLogger(every_n_steps=10)], {}),
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
    # Not run by default (`--only plain_xla logger_xla`): XLA on the CPU.
    "plain_xla": (lambda x, y: [], {"jit_compile": True}),
    "logger_xla": (lambda x, y: [kgrad.GradientNormLogger()], {"jit_compile": True}),
}
DEFAULT = [name for name in CONFIGS if not name.endswith("_xla")]


def baseline(name: str) -> str:
    """The configuration that `name` is compared with."""
    return "plain_xla" if CONFIGS[name][1].get("jit_compile") else "plain"


def run_once(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    keras.backend.clear_session()
    make_callbacks, compile_kwargs = CONFIGS[name]
    model = build_model(seed)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, **compile_kwargs.get("optimizer", {})),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=compile_kwargs.get("jit_compile", False),
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


class SharedModel:
    """One traced model on which every configuration's train function is traced.

    Rounds switch `model.train_function` (and the callbacks) between configurations:
    they share the variables, the optimizer and the input pipeline, so the comparison
    is free of where TensorFlow happened to place each model's buffers (two separate
    models of one configuration differ by up to ±5% per step on this machine).
    """

    def __init__(self, names: list[str], x: np.ndarray, y: np.ndarray):
        self.model = model = build_model(0)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0)
        self.steps = EXAMPLES // BATCH
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
        self.iterator = iter(dataset)
        self.functions, self.callbacks, self.epoch = {}, {}, 0
        # Each configuration counts its own steps, as in a `fit` of its own: the
        # callbacks schedule work by step (probes every 50 steps, logged steps), and
        # the shared optimizer's counter also advances in the other rounds.
        self.iterations: dict[str, int] = {}
        for name in names:
            make_callbacks, compile_kwargs = CONFIGS[name]
            options = compile_kwargs.get("optimizer", {})
            for key, value in options.items():  # read when the step is traced
                setattr(model.optimizer, key, value)
            model.jit_compile = compile_kwargs.get("jit_compile", False)
            callbacks = keras.callbacks.CallbackList(
                make_callbacks(x, y),
                model=model,
                add_history=True,
                add_progbar=False,
                epochs=1_000_000,
                steps=self.steps,
                verbose=0,
            )
            callbacks.on_train_begin()
            model.make_train_function(force=True)
            self.functions[name], self.callbacks[name] = model.train_function, callbacks
            self.run_epoch(name)  # traces it (and any probe function)
            for key in options:
                setattr(model.optimizer, key, None)
            # The next configuration is traced without this one's step participants;
            # this one's function keeps them (a traced function does not change).
            hook = StepHook.attach(model)
            hook._observers.clear()
            hook._transforms.clear()

    def run_epoch(self, name: str) -> tuple[float, float]:
        """One epoch of `name`: (wall, CPU) seconds per step."""
        callbacks, function = self.callbacks[name], self.functions[name]
        iterations = self.model.optimizer.iterations
        iterations.assign(self.iterations.get(name, int(iterations.numpy())))
        start, cpu_start = time.perf_counter(), time.process_time()
        callbacks.on_epoch_begin(self.epoch)
        logs = {}
        for step in range(self.steps):
            callbacks.on_train_batch_begin(step)
            logs = function(self.iterator)
            callbacks.on_train_batch_end(step, logs)
        callbacks.on_epoch_end(self.epoch, dict(logs))
        wall = (time.perf_counter() - start) / self.steps
        cpu = (time.process_time() - cpu_start) / self.steps
        self.epoch += 1
        self.iterations[name] = int(iterations.numpy())
        return wall, cpu


def per_step(
    names: list[str], x: np.ndarray, y: np.ndarray, rounds: int, instances: int
) -> dict:
    """Per round and configuration: the mean (wall, CPU) seconds per step over the
    shared models, the configurations alternating on each."""
    models = []
    for _ in range(instances):
        keras.utils.set_random_seed(0)
        models.append(SharedModel(names, x, y))
    seconds = {name: [] for name in names}
    for round_ in range(rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        times = {name: [] for name in names}
        for shared in models:
            for name in order:
                times[name].append(shared.run_epoch(name))
        for name in names:
            seconds[name].append(tuple(np.mean(times[name], axis=0)))
    for shared in models:
        for callbacks in shared.callbacks.values():
            callbacks.on_train_end()
    return seconds


METRICS = ("fit s", "fit ratio", "steady ratio", "ms/step", "per-step ratio", "CPU ratio")


def measure(names: list[str], reps: int, rounds: int, instances: int) -> dict:
    """{configuration: {metric: value}} from one process (medians over repetitions)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=EXAMPLES)
    run_once("plain", x, y, seed=0)  # warm-up: imports, thread pools

    totals = {n: [] for n in names}
    steady = {n: [] for n in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            total, steady_seconds = run_once(name, x, y, seed=rep)
            totals[name].append(total)
            steady[name].append(steady_seconds)
        print(f"repetition {rep + 1}/{reps} done", flush=True)
    steps = per_step(names, x, y, rounds, instances) if rounds > 0 else None

    def ratio(values: dict, name: str, index: int | None = None) -> float:
        pick = (lambda v: v) if index is None else (lambda v: v[index])
        return statistics.median(
            pick(t) / pick(p) for t, p in zip(values[name], values[baseline(name)])
        )

    results = {}
    for name in names:
        row = {
            "fit s": statistics.median(totals[name]),
            "fit ratio": ratio(totals, name),
            "steady ratio": ratio(steady, name),
        }
        if steps:
            row["ms/step"] = 1e3 * statistics.median(t[0] for t in steps[name])
            row["per-step ratio"] = ratio(steps, name, 0)
            row["CPU ratio"] = ratio(steps, name, 1)
        results[name] = row
    return results


def print_table(runs: list[dict]) -> None:
    """Medians over processes, with their range when there are several."""
    names = list(runs[0])
    metrics = [m for m in METRICS if m in runs[0][names[0]]]
    width = 22 if len(runs) > 1 else 16
    header = f"{'configuration':<18}" + "".join(f"{m:>{width}}" for m in metrics)
    print(header)
    print("-" * len(header))
    for name in names:
        line = f"{name:<18}"
        for metric in metrics:
            values = [run[name][metric] for run in runs]
            cell = f"{statistics.median(values):.3f}"
            if len(runs) > 1:
                cell += f" ({min(values):.2f}-{max(values):.2f})"
            line += f"{cell:>{width}}"
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=15, help="per-step rounds of one epoch (default 15)"
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=3,
        help="shared models in the per-step measurement (default 3)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="repeat everything in this many fresh processes; report medians and "
        "ranges over them (default 1)",
    )
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", nargs="*", default=None, help=f"configurations: {list(CONFIGS)}"
    )
    args = parser.parse_args(argv)
    names = args.only or DEFAULT
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown}; choose from {list(CONFIGS)}")
    for base in dict.fromkeys(baseline(n) for n in names):
        if base not in names:
            names = [base, *names]

    if args.processes > 1:
        runs = []
        with tempfile.TemporaryDirectory() as folder:
            for process in range(args.processes):
                path = os.path.join(folder, f"{process}.json")
                command = [sys.executable, os.path.abspath(__file__), "--json", path]
                command += ["--reps", str(args.reps), "--rounds", str(args.rounds)]
                command += ["--instances", str(args.instances), "--only", *names]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                with open(path) as file:
                    runs.append(json.load(file))
                print(f"process {process + 1}/{args.processes} done", flush=True)
    else:
        runs = [measure(names, args.reps, args.rounds, args.instances)]
        if args.json:
            with open(args.json, "w") as file:
                json.dump(runs[0], file)
            return
    print(
        f"\n{DEPTH}-layer {WIDTH}-wide ReLU MLP, {EXAMPLES} examples, batch {BATCH}, "
        f"{EPOCHS} epochs, {args.reps} repetitions, {args.processes} process(es), "
        f"{os.cpu_count()} CPUs, TensorFlow {tf.__version__}, Keras {keras.__version__}\n"
    )
    print_table(runs)


if __name__ == "__main__":
    main()
