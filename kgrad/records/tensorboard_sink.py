"""TensorBoard scalars and histograms of gradient records."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from kgrad.records.gradient_records import GradientRecords
from kgrad.records.paths import check_writable_dir


def _summary() -> Any:
    """`tf.summary`, imported on first use (`kgrad.backend.tensorflow.summary`)."""
    from kgrad.backend import tensorflow as tensorflow_backend

    return tensorflow_backend.summary()


class TensorBoardSink:
    """Writes gradient norms as TensorBoard scalars, and gradients as histograms.

    Scalars: `grad_norm/global`, `grad_norm/first_to_last` and one
    `grad_norm/<layer>/<variable>` per recorded variable, at the training step.

    Args:
        logdir: The folder for the event files (created if needed). Use the same
            folder as `keras.callbacks.TensorBoard(log_dir=...)`'s `train`
            subfolder to see them next to the loss.

    Raises:
        ValueError: if the folder cannot be written.
    """

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = check_writable_dir(logdir, "tensorboard_dir")
        self._writer: Any = None

    def _get_writer(self) -> Any:
        if self._writer is None:
            self._writer = _summary().create_file_writer(self.logdir)
        return self._writer

    def write_scalars(self, records: GradientRecords, start: int) -> None:
        """Writes the rows of `records` from row `start` on."""
        steps = records.steps[start:]
        if steps.size == 0:
            return
        names = [f"grad_norm/{info.layer}/{info.variable}" for info in records.variables]
        grads = records.grad_norms[start:]
        global_norms = records.global_norms[start:]
        ratios = records.first_to_last()[start:]
        with self._get_writer().as_default():
            for row, step in enumerate(steps.tolist()):
                _summary().scalar("grad_norm/global", global_norms[row], step=step)
                _summary().scalar("grad_norm/first_to_last", ratios[row], step=step)
                for column, name in enumerate(names):
                    _summary().scalar(name, grads[row, column], step=step)
        self._writer.flush()

    def write_histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        """Writes one histogram per named array at `step`."""
        with self._get_writer().as_default():
            for name, value in values.items():
                finite = value[np.isfinite(value)]
                _summary().histogram(f"grad/{name}", finite, step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
