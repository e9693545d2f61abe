"""Memory and wall time of zoo's keras-tuner searches.

Three measurements, each configuration in a fresh Python process:

- memory: the resident set size (RSS) after each of `--trials` trials of a small
  `RandomSearch` over `zoo.HyperMLP` on digits, for several set-ups: a bare keras-tuner
  hypermodel (no kgrad) as the reference, `zoo.HyperMLP` as shipped, and `zoo.HyperMLP`
  with extra mitigations (`gc.collect()` + `keras.backend.clear_session(free_memory=True)`
  after every trial, `MALLOC_ARENA_MAX=2`), and the same kind of models fitted in a plain
  Keras loop (compiled, and `run_eagerly=True`), which locates the growth. Growth is the
  RSS after the last trial minus the RSS after the second (the first trials load and
  trace what later ones reuse);
- trial time: the median wall time per trial of the same search (from the shipped run);
- distributed: the wall time of `zoo.distributed.launch` on the same trials with 1 and
  with 2 workers (the chief's 20 s exit poll excluded: `chief_grace=0`).

Usage:

    python benchmarks/bench_tuner.py                       # everything
    python benchmarks/bench_tuner.py --only memory --trials 20
    python benchmarks/bench_tuner.py --only distributed --distributed-trials 8
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MEMORY_SETUPS = {
    "bare keras-tuner (no kgrad)": ("bare", {}),
    "zoo.HyperMLP": ("zoo", {}),
    "zoo.HyperMLP + gc/clear_session per trial": ("zoo_cleanup", {}),
    "zoo.HyperMLP + MALLOC_ARENA_MAX=2": ("zoo", {"MALLOC_ARENA_MAX": "2"}),
    "plain Keras loop (no keras-tuner, no kgrad)": ("keras_loop", {}),
    "plain Keras loop, run_eagerly=True": ("keras_loop_eager", {}),
}


def run_search(kind: str, trials: int) -> dict:
    """The child process: one search, RSS and seconds after every trial."""
    import gc

    import keras
    import keras_tuner
    import psutil

    import zoo

    data = zoo.datasets.load("digits")
    x, y = data.x_train[:512], data.y_train[:512]
    space = dict(depth=(2, 6), width=[16, 32], block=["plain", "residual", "batchnorm"],
                 activation=["relu", "sigmoid"], learning_rate=1e-2, batch_size=[32, 64])
    if kind.startswith("keras_loop"):
        return _keras_loop(data, x, y, trials, eager=kind.endswith("eager"))
    if kind == "bare":
        hypermodel = _BareHyperModel(space)
    else:
        hypermodel = zoo.HyperMLP(data.input_shape, data.num_classes, **space)
    process = psutil.Process()
    samples = []

    class Measured(keras_tuner.RandomSearch):
        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            if kind == "zoo_cleanup":
                keras.backend.clear_session(free_memory=True)
                gc.collect()
            samples.append((process.memory_info().rss / 2**20, time.perf_counter()))

    with tempfile.TemporaryDirectory() as directory:
        tuner = Measured(hypermodel, "val_accuracy", max_trials=trials, seed=11,
                         directory=directory)
        started = time.perf_counter()
        tuner.search(x, y, validation_data=(data.x_test, data.y_test), epochs=2, verbose=0)
    times = [t for _, t in samples]
    return {
        "rss_mb": [rss for rss, _ in samples],
        "trial_seconds": [b - a for a, b in zip([started] + times[:-1], times)],
    }


def _keras_loop(data, x, y, models: int, eager: bool) -> dict:
    """The same kind of models fitted in a loop with `clear_session()`: TF's share."""
    import gc

    import keras
    import psutil

    import zoo

    process, samples = psutil.Process(), []
    started = time.perf_counter()
    for index in range(models):
        keras.backend.clear_session()
        gc.collect()
        model = zoo.build_mlp((64,), 10, depth=2 + index % 5, width=16 * (1 + index % 2),
                              block=("plain", "residual", "batchnorm")[index % 3])
        model.compile(keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"], run_eagerly=eager)
        model.fit(x, y, validation_data=(data.x_test, data.y_test), epochs=2,
                  batch_size=32, verbose=0)
        samples.append((process.memory_info().rss / 2**20, time.perf_counter()))
    times = [t for _, t in samples]
    return {
        "rss_mb": [rss for rss, _ in samples],
        "trial_seconds": [b - a for a, b in zip([started] + times[:-1], times)],
    }


class _BareHyperModel:
    """The same models without kgrad or zoo's fit: what keras-tuner alone costs."""

    def __new__(cls, space):
        import keras
        import keras_tuner

        import zoo

        class Bare(keras_tuner.HyperModel):
            def build(self, hp):
                model = zoo.build_mlp(
                    (64,), 10, depth=hp.Int("depth", *space["depth"]),
                    width=hp.Choice("width", space["width"]),
                    block=hp.Choice("block", space["block"]),
                    activation=hp.Choice("activation", space["activation"]),
                )
                model.compile(keras.optimizers.Adam(space["learning_rate"]),
                              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                return model

            def declare_hyperparameters(self, hp):
                hp.Choice("batch_size", space["batch_size"])

            def fit(self, hp, model, *args, **kwargs):
                return model.fit(*args, batch_size=hp.get("batch_size"), **kwargs)

        return Bare()


def _child(kind: str, trials: int, environment: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--trials", str(trials)],
        env=dict(os.environ, **environment), capture_output=True, text=True, check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def bench_memory(trials: int) -> None:
    print(f"RSS over {trials} trials (MiB; growth = last - after trial 2):")
    print(f"{'set-up':45s} {'trial 1':>8s} {'trial 2':>8s} {'last':>8s} {'growth':>8s} "
          f"{'per trial':>9s} {'s/trial':>8s}")
    for label, (kind, environment) in MEMORY_SETUPS.items():
        result = _child(kind, trials, environment)
        rss = result["rss_mb"]
        growth = rss[-1] - rss[1]
        per_trial = statistics.median(result["trial_seconds"][1:])
        print(f"{label:45s} {rss[0]:8.0f} {rss[1]:8.0f} {rss[-1]:8.0f} {growth:8.0f} "
              f"{growth / (len(rss) - 2):9.1f} {per_trial:8.2f}", flush=True)


def bench_distributed(trials: int) -> None:
    from zoo import distributed
    from zoo.examples import distributed_digits

    print(f"Distributed search, {trials} trials of the example script (wall seconds):")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as directory:
            started = time.perf_counter()
            frame = distributed.launch(
                distributed_digits.__file__, workers=workers, directory=directory,
                project_name="bench", args=["--max-trials", str(trials), "--epochs", "3"],
                chief_grace=0.0, stream=open(os.devnull, "w"),
            )
            seconds = time.perf_counter() - started
        assert len(frame) == trials
        print(f"  {workers} worker(s): {seconds:6.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["memory", "distributed"], default=None)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--distributed-trials", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(run_search(options.child, options.trials)))
        return
    if options.only in (None, "memory"):
        bench_memory(options.trials)
    if options.only in (None, "distributed"):
        bench_distributed(options.distributed_trials)


if __name__ == "__main__":
    main()
