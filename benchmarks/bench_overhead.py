"""Wall-time overhead of kgrad's callbacks against plain `model.fit`, side by side.

The default model is the core issue's: a 20-layer, 128-wide ReLU MLP on 8,192 examples,
batch 64, 3 epochs, on the CPU; `--model resnet|transformer|lstm` trains one of the
realistic models of `workloads.py` instead (a CIFAR-shaped ResNet-20, a transformer
text classifier, a bidirectional LSTM; synthetic inputs). Every configuration runs in
this one process, in alternating order, for several repetitions; each repetition's time
is divided by the plain fit of the same repetition, and the table reports medians.

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

`--xla` adds every configuration compiled with `jit_compile=True`, each compared with
the plain XLA fit. `--refit N` measures repeated `fit()` calls instead (N rounds on one
model, each round four 2-epoch fits in the order plain, plain, logger, logger, the
logger one and the same instance): the whole-`fit` time of a plain fit after a plain
one (the baseline), of a fit with the same logger after one with it, of a plain fit
right after one with the logger, and of the logger's fit after a plain one. Reusing
the traced train functions makes them all ~1.0; tracing again costs its trace.

Usage:

    python benchmarks/bench_overhead.py               # all configurations, 5 repetitions
    python benchmarks/bench_overhead.py --reps 3 --only plain logger naive
    python benchmarks/bench_overhead.py --rounds 0     # skip the per-step measurement
    python benchmarks/bench_overhead.py --processes 3  # medians and ranges over 3 fresh
                                                       # processes (placement varies)
    python benchmarks/bench_overhead.py --only plain_xla logger_xla  # under XLA, each
                                                       # against the plain XLA fit
    python benchmarks/bench_overhead.py --model resnet --xla  # a realistic model, every
                                                       # configuration with and without XLA
    python benchmarks/bench_overhead.py --refit 5      # repeated fits (issue 15)
    python benchmarks/bench_overhead.py --quick --model lstm  # a smoke run
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
from workloads import WORKLOADS, Workload  # noqa: E402

EPOCHS, REFIT_EPOCHS = 3, 2

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


# name -> (callbacks factory of (x, y, batch size), extra compile arguments). A
# configuration compiled with `jit_compile=True` is compared with `plain_xla`, every
# other one with `plain`.
Config = tuple[Callable[[np.ndarray, np.ndarray, int], list], dict]
CONFIGS: dict[str, Config] = {
    "plain": (lambda x, y, batch: [], {}),
    "logger": (lambda x, y, batch: [kgrad.GradientNormLogger()], {}),
    "logger_every_10": (
        lambda x, y, batch: [kgrad.GradientNormLogger(every_n_steps=10)], {}
    ),
    "naive": (lambda x, y, batch: [NaiveTapeLogger(x[:batch], y[:batch])], {}),
    "global_clipnorm": (lambda x, y, batch: [], {"optimizer": {"global_clipnorm": 1.0}}),
    "clip_global_norm": (
        lambda x, y, batch: [kgrad.GradientClipping("global_norm", 1.0)], {}
    ),
    "clip_agc": (lambda x, y, batch: [kgrad.GradientClipping("agc")], {}),
    "monitor": (
        lambda x, y, batch: [
            kgrad.GradientHealthMonitor(probe_data=x[:256], probe_every_n_steps=50, verbose=0)
        ],
        {},
    ),
}
# Each configuration under XLA (`--xla`, or by name): `<name>_xla`. The naive tape
# logger runs a function of its own, not the train function: it has no XLA variant.
CONFIGS.update(
    {
        f"{name}_xla": (make_callbacks, {**options, "jit_compile": True})
        for name, (make_callbacks, options) in list(CONFIGS.items())
        if name != "naive"
    }
)
DEFAULT = [name for name in CONFIGS if not name.endswith("_xla")]
# The realistic models: the configurations of issue 19.
REALISTIC = ["plain", "logger", "monitor", "global_clipnorm", "clip_global_norm", "clip_agc"]


def compile_model(model: keras.Model, compile_kwargs: dict | None = None) -> None:
    compile_kwargs = compile_kwargs or {}
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, **compile_kwargs.get("optimizer", {})),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=compile_kwargs.get("jit_compile", False),
    )


def baseline(name: str) -> str:
    """The configuration that `name` is compared with."""
    return "plain_xla" if CONFIGS[name][1].get("jit_compile") else "plain"


def clear_participants(hook: StepHook) -> None:
    """Takes every observer and transform out of `hook`, so the next train function
    is traced without them (one that is traced already keeps them)."""
    if hasattr(hook, "_participants"):  # the hook that keys train functions by them
        hook._participants.clear()
        hook._key = hook._make_key()
    else:
        hook._observers.clear()
        hook._transforms.clear()


def run_once(
    name: str, workload: Workload, x: np.ndarray, y: np.ndarray, seed: int, epochs: int
) -> tuple[float, float]:
    keras.backend.clear_session()
    make_callbacks, compile_kwargs = CONFIGS[name]
    model = workload.build(seed)
    compile_model(model, compile_kwargs)
    timer = EpochTimer()
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=workload.batch,
        epochs=epochs,
        verbose=0,
        callbacks=make_callbacks(x, y, workload.batch) + [timer],
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

    def __init__(
        self, names: list[str], workload: Workload, x: np.ndarray, y: np.ndarray
    ):
        self.model = model = workload.build(0)
        compile_model(model)
        batch = workload.batch
        model.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)
        self.steps = len(x) // batch
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
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
                make_callbacks(x, y, batch),
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
            clear_participants(StepHook.attach(model))

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
    names: list[str],
    workload: Workload,
    x: np.ndarray,
    y: np.ndarray,
    rounds: int,
    instances: int,
) -> dict:
    """Per round and configuration: the mean (wall, CPU) seconds per step over the
    shared models, the configurations alternating on each."""
    models = []
    for _ in range(instances):
        keras.utils.set_random_seed(0)
        models.append(SharedModel(names, workload, x, y))
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


def measure(
    names: list[str], workload: Workload, reps: int, rounds: int, instances: int,
    examples: int | None = None, epochs: int = EPOCHS,
) -> dict:
    """{configuration: {metric: value}} from one process (medians over repetitions)."""
    x, y = workload.data(examples)
    run_once("plain", workload, x, y, seed=0, epochs=1)  # warm-up: imports, threads

    totals = {n: [] for n in names}
    steady = {n: [] for n in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            total, steady_seconds = run_once(name, workload, x, y, rep, epochs)
            totals[name].append(total)
            steady[name].append(steady_seconds)
        print(f"repetition {rep + 1}/{reps} done", flush=True)
    steps = per_step(names, workload, x, y, rounds, instances) if rounds > 0 else None

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


REFIT_ORDER = ("plain", "plain", "logger", "logger")
# (previous fit, this fit) -> row of the refit table.
REFIT_ROWS = {
    ("plain", "plain"): "plain after plain",
    ("logger", "logger"): "logger again",
    ("logger", "plain"): "plain after logger",
    ("plain", "logger"): "logger after plain",
}


def refit(
    workload: Workload, rounds: int, examples: int | None, jit_compile: bool
) -> dict:
    """Whole-`fit` times of repeated 2-epoch fits on one model, by what came before.

    One `GradientNormLogger` instance serves every logger fit. After a warm-up round
    (the first fit of each kind traces), each round runs `REFIT_ORDER`, so that every
    transition of `REFIT_ROWS` occurs once per round; ratios are taken against the
    plain fit after a plain fit of the same round.
    """
    x, y = workload.data(examples)
    keras.backend.clear_session()
    model = workload.build(0)
    compile_model(model, {"jit_compile": jit_compile})
    logger = kgrad.GradientNormLogger()

    def fit(kind: str) -> float:
        start = time.perf_counter()
        model.fit(
            x, y, batch_size=workload.batch, epochs=REFIT_EPOCHS, verbose=0,
            callbacks=[logger] if kind == "logger" else [],
        )
        return time.perf_counter() - start

    for kind in REFIT_ORDER:
        fit(kind)
    previous = REFIT_ORDER[-1]
    times = {row: [] for row in REFIT_ROWS.values()}
    for round_ in range(rounds):
        for kind in REFIT_ORDER:
            times[REFIT_ROWS[previous, kind]].append(fit(kind))
            previous = kind
        print(f"refit round {round_ + 1}/{rounds} done", flush=True)
    base = times["plain after plain"]
    return {
        row: {
            "fit s": statistics.median(seconds),
            "fit ratio": statistics.median(t / p for t, p in zip(seconds, base)),
        }
        for row, seconds in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=list(WORKLOADS), default="mlp", help="default mlp"
    )
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
    parser.add_argument(
        "--examples", type=int, default=None,
        help="examples per epoch (default: the model's, 8192 for the MLP, 1024 else)",
    )
    parser.add_argument(
        "--xla", action="store_true",
        help="also each configuration with jit_compile=True (against plain_xla)",
    )
    parser.add_argument(
        "--refit", type=int, default=0, metavar="N",
        help="measure N rounds of repeated fits instead (see above)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: 4 batches an epoch, 2 epochs, 1 repetition, 2 rounds",
    )
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", nargs="*", default=None, help=f"configurations: {list(CONFIGS)}"
    )
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.model]
    epochs = EPOCHS
    if args.quick:
        args.examples = args.examples or 4 * workload.batch
        args.reps, args.rounds, args.instances, epochs = 1, 2, 1, 2
        args.refit = min(args.refit, 1)
    names = args.only or (DEFAULT if args.model == "mlp" else REALISTIC)
    if args.xla and not args.only:
        names = names + [f"{n}_xla" for n in names if f"{n}_xla" in CONFIGS]
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
                command += ["--model", args.model, "--reps", str(args.reps)]
                command += ["--rounds", str(args.rounds), "--refit", str(args.refit)]
                command += ["--instances", str(args.instances), "--only", *names]
                command += ["--xla"] if args.xla else []
                command += ["--quick"] if args.quick else []
                if args.examples:
                    command += ["--examples", str(args.examples)]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                with open(path) as file:
                    runs.append(json.load(file))
                print(f"process {process + 1}/{args.processes} done", flush=True)
    else:
        if args.refit:
            runs = [refit(workload, args.refit, args.examples, args.xla)]
        else:
            runs = [
                measure(names, workload, args.reps, args.rounds, args.instances,
                        args.examples, epochs)
            ]
        if args.json:
            with open(args.json, "w") as file:
                json.dump(runs[0], file)
            return
    examples = args.examples or workload.examples
    what = (
        f"{args.refit} refit rounds of {REFIT_EPOCHS}-epoch fits"
        + (" (jit_compile=True)" if args.xla else "")
        if args.refit
        else f"{epochs} epochs, {args.reps} repetitions"
    )
    print(
        f"\n{workload.description}, {examples} examples, {what}, "
        f"{args.processes} process(es), {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}\n"
    )
    print_table(runs)


if __name__ == "__main__":
    main()
