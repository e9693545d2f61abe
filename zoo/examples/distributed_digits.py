"""A small keras-tuner search on digits, for `python -m zoo.distributed` (or alone).

Run distributed on this machine:

    python -m zoo.distributed zoo/examples/distributed_digits.py --workers 2 \\
        --directory searches --project-name digits -- --max-trials 4

The tuner's directory and project come from `ZOO_TUNER_DIRECTORY` / `ZOO_TUNER_PROJECT`
(set by the launcher) or `--directory` / `--project-name`. Each process prints its
keras-tuner id when it starts, and each worker one line per finished trial.
"""

from __future__ import annotations

import argparse
import os

import keras
import keras_tuner

import zoo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", default=os.environ.get("ZOO_TUNER_DIRECTORY", "searches"))
    parser.add_argument("--project-name", default=os.environ.get("ZOO_TUNER_PROJECT", "digits"))
    parser.add_argument("--max-trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--examples", type=int, default=256, help="training examples used")
    options = parser.parse_args(argv)

    role = os.environ.get("KERASTUNER_TUNER_ID", "tuner0")
    print(f"{role} ready (pid {os.getpid()})", flush=True)
    data = zoo.datasets.load("digits")
    hypermodel = zoo.HyperMLP(
        data.input_shape, data.num_classes, depth=(1, 3), width=[8, 16],
        block=["plain", "residual"], activation="relu", kernel_initializer="auto",
        dropout=0.0, learning_rate=1e-2, batch_size=[32, 64],
    )
    tuner = keras_tuner.RandomSearch(
        hypermodel, "val_accuracy", max_trials=options.max_trials, seed=7,
        directory=options.directory, project_name=options.project_name,
    )
    tuner.search(
        data.x_train[: options.examples], data.y_train[: options.examples],
        validation_data=(data.x_test, data.y_test), epochs=options.epochs, verbose=0,
        callbacks=[_TrialLine(role)],
    )


class _TrialLine(keras.callbacks.Callback):
    """Prints one line per finished trial run: which worker trained what."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def on_train_end(self, logs=None):
        logs = logs or {}
        print(f"{self.role} finished a trial: val_accuracy="
              f"{logs.get('val_accuracy', float('nan')):.3f}", flush=True)


if __name__ == "__main__":
    main()
