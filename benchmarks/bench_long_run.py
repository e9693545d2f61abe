"""Does the logger's cost per epoch grow over a long run? Epoch 1 against epoch 1,000.

A 50-layer model of narrow Dense layers (100 tracked variables, as in the records'
memory test) trains for `--epochs` short epochs of `--steps` steps with a
`GradientNormLogger` logging every step. Two costs are timed at every epoch end:

- `logger`: the logger's own `on_epoch_end` (fetching the device buffer, appending
  to the records, the sinks, the per-epoch logs);
- `read`: a read of all the records so far, as the health monitor makes every epoch
  (`records.global_norms[rows_seen:]`) and as any reader of `logger.records` does.

The table gives the median over the first and over the last `--window` epochs, and
the records' size at the end. Flat columns mean appends and reads cost a constant
time per epoch however long the run.

Usage:

    python benchmarks/bench_long_run.py                 # 1,000 epochs of 100 steps
    python benchmarks/bench_long_run.py --steps 10      # quicker: 10,000 rows
    python benchmarks/bench_long_run.py --quick         # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kgrad  # noqa: E402

LAYERS, WIDTH, BATCH = 50, 4, 8


class TimedLogger(kgrad.GradientNormLogger):
    """The logger, with the time of each `on_epoch_end` and of a read of its records."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.epoch_seconds, self.read_seconds = [], []

    def on_epoch_end(self, epoch, logs=None):
        start = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        middle = time.perf_counter()
        float(np.isfinite(self.records.global_norms[-1:]).all())  # what a reader does
        read = self.records.global_norms
        float(read[len(read) // 2])
        self.epoch_seconds.append(middle - start)
        self.read_seconds.append(time.perf_counter() - middle)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000, help="default 1000")
    parser.add_argument("--steps", type=int, default=100, help="per epoch (default 100)")
    parser.add_argument("--window", type=int, default=20, help="epochs (default 20)")
    parser.add_argument("--quick", action="store_true", help="200 epochs of 5 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.steps, args.window = 200, 5, 10
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((WIDTH,))]
        + [keras.layers.Dense(WIDTH, activation="relu") for _ in range(LAYERS - 1)]
        + [keras.layers.Dense(2)]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.steps * BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, 2, size=len(x))
    logger = TimedLogger()
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=args.epochs, verbose=0, callbacks=[logger])
    total = time.perf_counter() - start
    records = logger.records
    print(
        f"\n{LAYERS} Dense layers ({len(records.variables)} tracked variables), "
        f"{args.epochs} epochs of {args.steps} steps, {len(records)} logged steps, "
        f"records {records.nbytes / 2**20:.1f} MiB, fit {total:.0f} s, "
        f"{os.cpu_count()} CPUs, TensorFlow {tf.__version__}, Keras {keras.__version__}\n"
    )
    window = args.window
    print(f"{'ms per epoch':<14}{f'epochs 1-{window}':>16}{f'last {window}':>16}{'ratio':>10}")
    print("-" * 56)
    for name, seconds in (("logger", logger.epoch_seconds), ("read", logger.read_seconds)):
        first = 1e3 * statistics.median(seconds[:window])
        last = 1e3 * statistics.median(seconds[-window:])
        print(f"{name:<14}{first:>16.3f}{last:>16.3f}{last / first:>10.2f}")


if __name__ == "__main__":
    main()
