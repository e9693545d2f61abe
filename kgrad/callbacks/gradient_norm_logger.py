"""`GradientNormLogger`: exact per-layer gradient norms from the real training step."""

from __future__ import annotations

import math
import os
import secrets
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kgrad import backend
from kgrad.callbacks.base import KgradCallback, check_positive_int, check_trainable
from kgrad.capture.norm_buffer import NormBuffer, OptimizerBuffers
from kgrad.capture.probe import (
    PROBE_BACKENDS,
    LossFunction,
    check_loss_fn,
    check_probe_data,
    probe_loss,
)
from kgrad.capture.step_hook import StepContext, StepHook, model_is_built
from kgrad.capture.variables import layer_names, track_variables
from kgrad.records.csv_sink import CsvSink
from kgrad.records.gradient_records import GradientRecords, VariableInfo
from kgrad.records.tensorboard_sink import TensorBoardSink

# Logged steps held on the device per epoch when the epoch length is unknown.
_UNKNOWN_EPOCH_CAPACITY = 4096
# The optimizer name of probe mode's records (and of its buffer's variables).
_PROBE = "probe"
# The backends whose step keeps the gradient copies of histograms (tested there).
_HISTOGRAM_BACKENDS = ("tensorflow", "jax", "torch")


class GradientNormLogger(KgradCallback):
    """Records per-layer gradient and weight norms during `model.fit`.

    In the default *real-step* mode the norms are those of the gradients the optimizer
    actually receives in each training step (unscaled under mixed precision, summed
    over replicas under a distribution strategy), captured inside the compiled train
    function with no extra forward or backward pass. The norms stay on the device and
    are fetched once per epoch. On a CPU this costs about 5% per step on a small MLP;
    with `jit_compile=True` on a CPU about 50%, since XLA's CPU reductions are slow
    (Keras leaves XLA off on a CPU by default): see the README's benchmarks.

    In *probe* mode (`probe_data=(x, y)`), the gradients are computed by the backend
    (`tf.GradientTape`, `jax.grad` at the current step's weights) on that fixed batch
    after every `every_n_steps` steps: for models whose own training step calls no
    Keras optimizer, and for comparing runs on the
    same inputs; with `loss_fn`, of that function's loss (for a model with no
    `call()`). It costs a forward and a backward pass per probe. Its records are
    those of optimizer `"probe"`.

    At the end of each epoch the logger adds to `logs` (so History, CSVLogger,
    EarlyStopping, the progress bar and TensorBoard see them; list the logger before
    those callbacks):

    - `grad_norm/global`: the mean global gradient norm over the epoch's logged steps;
    - `grad_norm/first_to_last`: the median ratio of the first recorded layer's
      gradient norm to the last one's (bias norms where every layer has a bias, since
      kernel norms can hide vanishing in ReLU nets; total norms otherwise).

    Args:
        every_n_steps: Log steps whose index is a multiple of this. In real-step
            mode the norms sit in branches taken on logged steps only (under a
            distribution strategy every step computes them); the untaken branches
            still cost a little, so on a small model the saving per step is small
            (see the README's benchmarks). Defaults to `1`.
        layers: Glob patterns over layer names (nested models as `outer/inner`); only
            matching layers are recorded. Defaults to `None`, every trainable layer.
        probe_data: `(x, y)` or `(x, y, sample_weight)` for probe mode; with
            `loss_fn`, also a bare batch (what `train_step` receives). Defaults to
            `None`, real-step mode.
        probe_training: The `training` flag of probe forward passes. Defaults to
            `False` (dropout off, batch-norm statistics untouched).
        csv_path: Append the tidy records to this CSV at the end of every epoch, with
            a `run` column; readable up to the last epoch after a crash. Defaults to
            `None`.
        tensorboard_dir: Write `grad_norm/...` scalars there at every logged step.
            Defaults to `None`.
        histogram_every_n_steps: With `tensorboard_dir`, also write gradient
            histograms of the tracked variables every that many steps (written at the
            end of each epoch). Defaults to `None`, no histograms.
        verbose: `1` prints a line per epoch with the global norm and the ratio.
            Defaults to `0`.
        weight_norms: Record each variable's weight norm beside its gradient norm.
            They are about a third of the logger's cost per step; `False` records
            NaN. Defaults to `True`.
        loss_fn: Probe mode only: `loss_fn(model, batch) -> scalar`, differentiated
            on `probe_data` instead of the compiled loss, for a model with no
            `call()` of its own (keras-io's GAN and VAE). Defaults to `None`.

    Raises:
        ValueError: on a bad argument (before training), or in `on_train_begin` when
            the model is not compiled, has no trainable weights, no layer matches
            `layers`, or `probe_data` does not fit the model.

    Example:

    >>> logger = kgrad.GradientNormLogger()
    >>> model.fit(x, y, epochs=3, callbacks=[logger])  # doctest: +SKIP
    >>> logger.to_dataframe().groupby("layer").grad_norm.median()  # doctest: +SKIP
    """

    _transient = ("_model", "_hook", "_buffers", "_probe", "_probe_function")

    def __init__(
        self,
        every_n_steps: int = 1,
        layers: str | Sequence[str] | None = None,
        probe_data: Sequence[Any] | None = None,
        probe_training: bool = False,
        csv_path: str | os.PathLike | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        histogram_every_n_steps: int | None = None,
        verbose: int = 0,
        weight_norms: bool = True,
        loss_fn: LossFunction | None = None,
    ):
        super().__init__()
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None and (
            not layers or not all(isinstance(p, str) and p for p in layers)
        ):
            raise ValueError(
                "`layers` must be a glob pattern or a non-empty list of them, such as "
                f"['dense*']. Received: layers={layers!r}"
            )
        self.layers = None if layers is None else list(layers)
        check_loss_fn(loss_fn)
        if loss_fn is not None and probe_data is None:
            raise ValueError(
                "`loss_fn` is differentiated on a fixed batch: pass that batch as "
                "`probe_data` too. Received: probe_data=None"
            )
        if loss_fn is not None and not isinstance(probe_data, (tuple, list)):
            probe_data = (probe_data, None)  # a bare batch, as a GAN's step takes
        self.loss_fn = loss_fn
        if probe_data is not None and (
            not isinstance(probe_data, (tuple, list)) or len(probe_data) not in (2, 3)
        ):
            raise ValueError(
                "`probe_data` must be a tuple `(x, y)` or `(x, y, sample_weight)`. "
                f"Received: probe_data of type {type(probe_data).__name__}"
            )
        self.probe_data = probe_data
        self.probe_training = bool(probe_training)
        self.histogram_every_n_steps = check_positive_int(
            histogram_every_n_steps, "histogram_every_n_steps", allow_none=True
        )
        if histogram_every_n_steps is not None and tensorboard_dir is None:
            raise ValueError(
                "`histogram_every_n_steps` writes TensorBoard histograms and needs "
                f"`tensorboard_dir`. Received: tensorboard_dir=None, "
                f"histogram_every_n_steps={histogram_every_n_steps}"
            )
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        self.tensorboard_dir = (
            None if tensorboard_dir is None else os.fspath(tensorboard_dir)
        )
        self._csv = CsvSink(csv_path) if csv_path is not None else None
        self._tensorboard = (
            TensorBoardSink(tensorboard_dir) if tensorboard_dir is not None else None
        )
        self.verbose = verbose
        self.weight_norms = bool(weight_norms)
        # In real-step mode the batch hook only checks, once, that the step was hooked:
        # safe to run asynchronously, so Keras keeps its asynchronous batch dispatch.
        self.async_safe = probe_data is None
        self.records_by_optimizer: dict[str, GradientRecords] = {}
        self._empty_records: GradientRecords | None = None
        self.run_id: str | None = None
        self._hook: StepHook | None = None
        # Kept from one `fit()` to the next while they fit: the train function
        # traced with them is then reused.
        self._buffers: OptimizerBuffers | None = None
        self._probe: _Probe | None = None
        self._probe_function = None
        # Who reports a step that calls no Keras optimizer, and what else works.
        self._label = "GradientNormLogger"
        self._advice = (
            "Or record the gradients on a fixed batch: "
            "`GradientNormLogger(probe_data=(x_batch, y_batch))` (add `loss_fn=` for "
            "a model with no `call()` of its own)."
        )

    # -- public results ---------------------------------------------------------------

    @property
    def records(self) -> GradientRecords | None:
        """The records of the last `fit()`: those of the one optimizer the step calls
        (of the first, in the model's order, when it calls several: see
        `records_by_optimizer`). `None` before any training."""
        if not self.records_by_optimizer:
            return self._empty_records
        return next(iter(self.records_by_optimizer.values()))

    @records.setter
    def records(self, value: GradientRecords | None) -> None:
        self._empty_records = value
        self.records_by_optimizer = {}

    def to_dataframe(self) -> pd.DataFrame:
        """The records of the last `fit()` as a tidy DataFrame.

        Returns:
            One row per (logged step, variable) with the columns `run, step, epoch,
            layer, depth, variable, kind, grad_norm, weight_norm, clipped_grad_norm,
            global_norm, optimizer`. `depth` 0 is nearest the input; `kind` is
            `kernel`, `bias` or `other`; `optimizer` names the model attribute of the
            optimizer that applied the gradient (`optimizer`, `d_optimizer`, ...).

        Raises:
            RuntimeError: before any training.
        """
        if self.records is None:
            raise RuntimeError(
                "GradientNormLogger has no records yet: pass it to "
                "`model.fit(callbacks=[logger])` first."
            )
        if not self.records_by_optimizer:
            return _with_optimizer(self.records.to_dataframe(), "optimizer")
        return pd.concat(
            [
                _with_optimizer(records.to_dataframe(), name)
                for name, records in self.records_by_optimizer.items()
            ],
            ignore_index=True,
        )

    # -- callback hooks ---------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        check_trainable(model)
        built = model_is_built(model)
        tracked = track_variables(model, self.layers) if built else None
        # Checked again: the destination may have vanished since `__init__`.
        if self.csv_path is not None:
            self._csv = CsvSink(self.csv_path)
        if self.tensorboard_dir is not None:
            self._tensorboard = TensorBoardSink(self.tensorboard_dir)

        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.records = GradientRecords([], run=self.run_id)
        steps = (self.params or {}).get("steps")
        capacity = (
            math.ceil(steps / self.every_n_steps) + 1
            if steps
            else _UNKNOWN_EPOCH_CAPACITY
        )
        self._histogram_step = -1
        self._checked = False
        self._probe_steps: list[int] = []
        self._last_probe_bucket = -1
        if self.histogram_every_n_steps:
            backend.require(
                "GradientNormLogger(histogram_every_n_steps=...)", _HISTOGRAM_BACKENDS
            )
        if self.probe_data is not None:
            backend.require("GradientNormLogger(probe_data=...)", PROBE_BACKENDS)
            self._start_probe_mode(capacity)
            return
        hook = StepHook.attach(model)
        trainable_ids = tuple(id(v) for v in model.trainable_variables)
        buffers = self._buffers
        if buffers is None or not buffers.fits(hook, capacity, trainable_ids):
            buffers = OptimizerBuffers(
                hook,
                self.layers,
                capacity,
                self.every_n_steps,
                self.histogram_every_n_steps,
                self.weight_norms,
            )
            # Made now when they can be: a TensorFlow step that makes variables in
            # its first trace is traced twice. A model built by its first batch has
            # no variables yet; with several optimizers, which variables each one
            # updates is known once they are built (in the step).
            if hook.state_before_step or (built and len(hook.optimizers) == 1):
                buffers.prepare(tracked)
        buffers.reset()
        self._buffers = buffers
        self._hook = hook
        hook.add(self, observe=buffers.write, state=buffers)
        self._first_steps = self._read_steps()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._probe is None:
            if not self._checked:
                self._checked = True
                self._check_hooked()
            return
        step = self._probe_first_step + batch
        self._probe_next_step = step + 1
        if self._probe_function is None:  # the model is built by its first step
            self._probe_function = self._make_probe_function()
        bucket = step // self.every_n_steps
        if bucket > self._last_probe_bucket:
            self._last_probe_bucket = bucket
            self._probe_function(step)
            self._probe_steps.append(step)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._probe is None and not self._checked:
            self._checked = True
            self._check_hooked()
        chunks = self._flush(epoch)
        if logs is None or not chunks:
            return
        added = sum(len(chunk) for chunk in chunks.values())
        chunk = next(iter(chunks.values()))
        ratios = chunk.first_to_last()
        logs["grad_norm/global"] = float(np.mean(chunk.global_norms))
        finite = ratios[~np.isnan(ratios)]
        logs["grad_norm/first_to_last"] = (
            float(np.median(finite)) if finite.size else float("nan")
        )
        if len(chunks) > 1:
            for name, each in chunks.items():
                logs[f"grad_norm/global/{name}"] = float(np.mean(each.global_norms))
        if self.verbose:
            print(
                f"GradientNormLogger epoch {epoch + 1}: global norm "
                f"{logs['grad_norm/global']:.3g}, first/last layer "
                f"{logs['grad_norm/first_to_last']:.3g} over {added} logged steps"
            )

    def on_train_end(self, logs: dict | None = None) -> None:
        try:
            if self._buffers is not None or self._probe is not None:
                self._flush(getattr(self, "_epoch", 0))
        finally:
            if self._hook is not None:
                self._hook.remove(self)
            if self._tensorboard is not None:
                self._tensorboard.close()
            self._hook = None
            self._probe = None
            self._probe_function = None

    # -- internals --------------------------------------------------------------------

    def _read_steps(self) -> dict[str, int]:
        hook = self._hook
        return {name: int(hook.step_variable(name).numpy()) for name in hook.optimizers}

    def _check_hooked(self) -> None:
        hook = self._hook
        if hook is None:
            return
        # `hook.model`, not `self.model`: on JAX, `self.model` syncs the step's state,
        # which the next step (already running when an async-safe batch hook runs)
        # donates.
        model = hook.model
        check_trainable(model)  # built now: its weights can be judged
        if not hook.traced:
            raise RuntimeError(hook.unused_message(self._label, self._advice))
        if not any(self._buffers.buffers.get(name) for name in hook.traced_optimizers):
            raise ValueError(
                f"GradientNormLogger found no gradient to record in model "
                f"{model.name!r}: the optimizers its step calls "
                f"({', '.join(sorted(hook.traced_optimizers))}) update no variable of "
                f"the layers {self.layers or 'of the model'}. Layers of this model: "
                f"{', '.join(layer_names(model))}"
            )

    def _start_probe_mode(self, capacity: int) -> None:
        """Probe mode: a buffer written by hand after the logged steps."""
        model = self.model
        self._probe = _Probe(capacity)
        self._probe_first_step = int(model.optimizer.iterations.numpy())
        self._probe_next_step = self._probe_first_step
        self._probe_function = None
        if model_is_built(model):
            self._probe_function = self._make_probe_function()

    def _make_probe_function(self):
        model, probe = self.model, self._probe
        hook = StepHook.attach(model)
        probe.batch = check_probe_data(model, self.probe_data, loss_fn=self.loss_fn)
        tracked = track_variables(model, self.layers)
        # Written by the probe, between steps: no part of the training step's state
        # (on JAX the optimizer of a name the step never calls keeps it out).
        probe.buffer = NormBuffer(
            hook,
            tracked,
            probe.capacity,
            self.every_n_steps,
            self.histogram_every_n_steps,
            self.weight_norms,
            optimizer=_PROBE,
        )
        x, y, sample_weight = probe.batch
        loss = probe_loss(
            model, x, y, sample_weight, self.probe_training, loss_fn=self.loss_fn
        )
        variables = list(model.trainable_variables)
        gradients_of = hook.backend.gradient_function(model, loss, variables)
        buffer = probe.buffer

        def probe_step(step):
            _, gradients = gradients_of()
            context = StepContext(
                variables=variables,
                gradients=list(gradients),
                applied=list(gradients),
                step=step,
                strategy=hook.strategy,
            )
            context.applied = context.gradients
            buffer.write(context, always=True)

        return hook.backend.compiled_probe_step(model, probe_step)

    def _fetch(self) -> dict[str, tuple[dict[str, np.ndarray], int, NormBuffer]]:
        """The rows logged since the last fetch, by optimizer."""
        if self._probe is not None:
            buffer = self._probe.buffer
            if buffer is None:
                return {}
            rows, dropped = buffer.fetch(self._probe_first_step, self._probe_steps)
            self._probe_steps = []
            return {_PROBE: (rows, dropped, buffer)}
        fetched = {}
        steps = self._read_steps()
        for name, buffer in self._buffers.buffers.items():
            if buffer is not None:
                rows, dropped = buffer.fetch(self._first_steps.get(name, 0))
                fetched[name] = (rows, dropped, buffer)
        self._first_steps = steps
        return fetched

    def _flush(self, epoch: int) -> dict[str, GradientRecords]:
        """Moves the buffered rows into the records and the sinks; returns the new
        ones, by optimizer."""
        chunks: dict[str, GradientRecords] = {}
        for name, (rows, dropped, buffer) in self._fetch().items():
            if dropped:
                warnings.warn(
                    f"GradientNormLogger: {dropped} logged steps of epoch {epoch + 1} "
                    "did not fit the device buffer (the epoch length was unknown) and "
                    "were dropped; raise `every_n_steps`.",
                    stacklevel=2,
                )
            if len(rows["step"]) == 0:
                continue
            variables = [VariableInfo(t.layer, t.depth, t.name, t.kind) for t in buffer.tracked]
            records = self.records_by_optimizer.get(name)
            if records is None:
                records = GradientRecords(variables, run=self.run_id)
                self.records_by_optimizer[name] = records
            chunk = GradientRecords(variables, run=self.run_id)
            chunk.append(epoch=epoch, **rows)
            records.append(epoch=epoch, **rows)
            chunks[name] = chunk
            if self._csv is not None:
                self._csv.write(_with_optimizer(chunk.to_dataframe(), name))
            if self._tensorboard is not None:
                self._tensorboard.write_scalars(chunk, 0)
                step, values = buffer.fetch_snapshot()
                if step > self._histogram_step:
                    self._histogram_step = step
                    self._tensorboard.write_histograms(step, values)
        return chunks


class _Probe:
    """Probe mode's run-time state: the batch and its buffer, made once built."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.batch = None
        self.buffer: NormBuffer | None = None


def _with_optimizer(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """`frame` with an `optimizer` column naming the optimizer of its gradients."""
    frame["optimizer"] = pd.Categorical([name] * len(frame))
    return frame
