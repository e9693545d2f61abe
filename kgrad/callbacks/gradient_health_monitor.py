"""`GradientHealthMonitor`: the diagnosis detectors, run during `model.fit`."""

from __future__ import annotations
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from kgrad import backend
from kgrad.callbacks.base import KgradCallback, check_positive_int, check_trainable
from kgrad.callbacks.gradient_norm_logger import GradientNormLogger
from kgrad.capture.probe import PROBE_BACKENDS, check_probe_data
from kgrad.capture.step_hook import model_is_built
from kgrad.capture.variables import track_variables
from kgrad.diagnosis.activations import network_context
from kgrad.diagnosis.graph import functional_reason
from kgrad.diagnosis.dead_units import DEAD_AFTER_PROBES
from kgrad.diagnosis.exploding import SPIKE_FACTOR, SPIKE_WINDOW
from kgrad.diagnosis.findings import Finding, FindingLog
from kgrad.diagnosis.from_records import (
    diagnose_records,
    gradient_findings,
    unit_findings,
)
from kgrad.diagnosis.report import Report
from kgrad.diagnosis.stalled import stalled_beyond_trend
from kgrad.diagnosis.unit_health import UnitHealth
from kgrad.diagnosis.unit_probe import UnitProbe, input_signature

HEALTH_KEYS = (
    "health/decay",
    "health/first_to_last",
    "health/dead_fraction",
    "health/saturated_fraction",
    "health/findings",
)


# By default the epoch-end diagnosis may take this share of the training time: on
# short epochs (under a second or two) it runs every few epochs instead of every one.
# Its cost is fixed per call (5-15 ms on a 20-layer MLP), the epochs' is not; a
# finding waits at most ~200 diagnosis durations of training (a second or three).
MAX_JUDGE_SHARE = 0.005

# Examples per probe by default: three probes in a row (a dead unit's test) then cover
# 384 examples. On the benchmark model a probe of 128 examples takes ~0.8 ms alone, of
# 256 ~1.3 ms, against ~1.1 ms for a training step of 64 (measured).
PROBE_BATCH_SIZE = 128


class GradientHealthWarning(UserWarning):
    """A gradient-health problem found during training."""


class GradientHealthMonitor(KgradCallback):
    """Watches gradient health during `fit` and says what is wrong, once.

    Gradients come from the real training step through a `GradientNormLogger` (its
    own, which records gradient norms only, leaving weight norms to the probes; or
    the one given as `logger`); at the end of every epoch the gradient
    detectors run on the epoch's logged steps: vanishing and growth across depth,
    non-finite gradients (first step, first layer), spikes of the global norm against
    a rolling median. Every `probe_every_n_steps` steps a probe measures how far each
    layer's weights moved (stalled layers) and, with `probe_data`, which ReLU units
    fired and how many sigmoid/tanh activations saturate, on the next
    `probe_batch_size` examples of `probe_data` (in turn: a forward pass costs in
    proportion to its examples). A unit is dead when it is silent for every example in
    `dead_after_probes` probes in a row, which cover `dead_after_probes` batches.

    Each new finding (a kind, or layers not named before for it) is announced once:
    printed when `verbose > 0`, else issued as a `GradientHealthWarning`. Every
    finding is kept in `monitor.findings` with its step; `monitor.report()` gives a
    `Report`. At each epoch end these go into `logs` (list the monitor before
    CSVLogger/EarlyStopping): `health/decay` (median per-layer ratio of the
    backpropagated signal), `health/first_to_last`, `health/dead_fraction` (dead
    units over all ReLU units), `health/saturated_fraction` (mean over sigmoid/tanh
    sites) and `health/findings` (findings made this epoch); NaN where unknown. The
    logger's `grad_norm/global` and `grad_norm/first_to_last` come along.

    The epoch-end diagnosis costs a few milliseconds. When epochs are so short that
    this would exceed `max_judge_share` of the training time, it waits for later
    epoch ends (judging everything logged and probed in between, with each finding's
    own step; the health values in `logs` then repeat those of the last diagnosis).
    The first epoch, an epoch with a non-finite gradient and the end of training
    are always judged.

    Args:
        probe_data: Probe inputs `x`, or `(x, y)` / `(x, y, sample_weight)` of which
            only `x` is used (a few hundred examples). Defaults to `None`: no unit
            statistics.
        probe_every_n_steps: Steps between probes. Defaults to `50`.
        probe_batch_size: Examples of `probe_data` per probe, taken in turn, or
            `None` to probe all of them every time. Defaults to `128`.
        every_n_steps: Log gradient norms at steps that are multiples of this (the
            monitor's own logger). Defaults to `1`.
        layers: Glob patterns of the layers to record (own logger). Defaults to
            `None`, every layer.
        logger: A `GradientNormLogger` that is also in `callbacks`, before the
            monitor, to read instead of creating one. Defaults to `None`.
        dead_after_probes: Probes in a row a unit must be silent to be dead.
            Defaults to `3`.
        spike_factor: A spike exceeds the rolling median by this factor. Defaults
            to `10.0`.
        spike_window: Logged steps in the rolling median. Defaults to `50`.
        verbose: `1` prints each new finding with its first fix; `0` issues
            warnings instead. Defaults to `1`.
        max_judge_share: The largest share of training wall time the epoch-end
            diagnosis may take, in (0, 1]; `None` judges at every epoch end.
            Defaults to `0.005`.

    Raises:
        ValueError: on a bad argument; in `on_train_begin`, when the model is not
            compiled, `probe_data` does not fit it, or `logger` is not placed
            before the monitor.

    References:
        Schoenholz et al. 2017; Yang et al. 2019; Lu et al. 2019; Pascanu et al. 2013.

    Example:

    >>> monitor = kgrad.GradientHealthMonitor(probe_data=x_train[:256])  # doctest: +SKIP
    >>> model.fit(x_train, y_train, epochs=5, callbacks=[monitor])  # doctest: +SKIP
    >>> print(monitor.report())  # doctest: +SKIP
    """

    _transient = (
        "_model",
        "_own_logger",
        "_kept_logger",
        "_probe",
        "_kept_probe",
        "_pending",
    )

    def __init__(
        self,
        probe_data: Any = None,
        probe_every_n_steps: int = 50,
        probe_batch_size: int | None = PROBE_BATCH_SIZE,
        every_n_steps: int = 1,
        layers: str | Sequence[str] | None = None,
        logger: GradientNormLogger | None = None,
        dead_after_probes: int = DEAD_AFTER_PROBES,
        spike_factor: float = SPIKE_FACTOR,
        spike_window: int = SPIKE_WINDOW,
        verbose: int = 1,
        max_judge_share: float | None = MAX_JUDGE_SHARE,
    ):
        super().__init__()
        if max_judge_share is not None and (
            isinstance(max_judge_share, bool)
            or not isinstance(max_judge_share, (int, float))
            or not 0 < max_judge_share <= 1
        ):
            raise ValueError(
                "`max_judge_share` must be a number in (0, 1] (the share of training "
                "time the epoch-end diagnosis may take) or `None` (judge every "
                f"epoch). Received: max_judge_share={max_judge_share!r}"
            )
        self.max_judge_share = max_judge_share
        self.probe_every_n_steps = check_positive_int(
            probe_every_n_steps, "probe_every_n_steps"
        )
        self.probe_batch_size = check_positive_int(
            probe_batch_size, "probe_batch_size", allow_none=True
        )
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        self.dead_after_probes = check_positive_int(
            dead_after_probes, "dead_after_probes"
        )
        self.spike_window = check_positive_int(spike_window, "spike_window")
        if (
            isinstance(spike_factor, bool)
            or not isinstance(spike_factor, (int, float))
            or not spike_factor > 1
        ):
            raise ValueError(
                "`spike_factor` must be a number greater than 1 (a spike is that many "
                f"times the rolling median). Received: spike_factor={spike_factor!r}"
            )
        self.spike_factor = float(spike_factor)
        if logger is not None and not isinstance(logger, GradientNormLogger):
            raise ValueError(
                "`logger` must be a `kgrad.GradientNormLogger` (or `None` to let the "
                f"monitor create one). Received: logger of type {type(logger).__name__}"
            )
        if logger is not None and (every_n_steps != 1 or layers is not None):
            raise ValueError(
                "`every_n_steps` and `layers` configure the monitor's own logger; with "
                "`logger=` set them on that logger instead. Received: "
                f"every_n_steps={every_n_steps}, layers={layers!r}"
            )
        self.logger = logger
        self.layers = [layers] if isinstance(layers, str) else layers
        if probe_data is not None and len(probe_data) == 0:
            raise ValueError(
                "`probe_data` is empty: give a few hundred probe examples."
            )
        self.probe_data = probe_data
        self.verbose = verbose
        self.async_safe = True  # the batch-end hook only passes on to the own logger
        self._log = FindingLog()
        self.unit_health: UnitHealth | None = None
        self._units = None
        self._records = None
        self._context = None
        self._notes: list[str] = []
        self._own_logger: GradientNormLogger | None = None
        # The own logger of the last `fit()`, reused by the next one on the same
        # model so that its traced train function is reused too.
        self._kept_logger: GradientNormLogger | None = None
        self._records_by_optimizer: dict = {}
        self._probe: UnitProbe | None = None
        # The probe of the last `fit()`, restarted by the next one when it serves the
        # same model: its compiled forward pass is reused (a new one is traced and
        # compiled again, ~0.4 s on JAX for the benchmark MLP).
        self._kept_probe: UnitProbe | None = None
        self._probe_batches = 1  # how many batches the probe set is cut into
        self._pending: list = []

    # -- public results ---------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """Every finding of the last `fit()`, in order, each with its step."""
        return self._log.findings

    @property
    def records(self):
        """The gradient records of the last `fit()` (from the logger used): those of
        the first optimizer the step calls (see `records_by_optimizer`)."""
        logger = self.logger or self._own_logger
        return logger.records if logger is not None else self._records

    @property
    def records_by_optimizer(self) -> dict:
        """The gradient records of the last `fit()` by optimizer (`"optimizer"`,
        `"d_optimizer"`, ...): the detectors judge each one on its own."""
        logger = self.logger or self._own_logger
        if logger is not None:
            return dict(logger.records_by_optimizer)
        return dict(self._records_by_optimizer)

    def report(self, optimizer: str | None = None) -> Report:
        """The `Report` of the last `fit()`: gradients over every logged step, unit
        statistics after the last probe, update ratios of the last probes.

        Args:
            optimizer: Whose gradients to report, when the step calls several
                optimizers (`"g_optimizer"`). Defaults to `None`: the first.

        Raises:
            RuntimeError: before any training.
            ValueError: if `optimizer` names no optimizer with records.
        """
        records = self.records
        if optimizer is not None:
            available = self.records_by_optimizer
            if optimizer not in available:
                raise ValueError(
                    f"`optimizer` must name an optimizer whose gradients were "
                    f"recorded. Received: optimizer={optimizer!r}; recorded: "
                    f"{', '.join(available) or 'none'}"
                )
            records = available[optimizer]
        if records is None or len(records) == 0:
            raise RuntimeError(
                "GradientHealthMonitor has nothing to report yet: pass it to "
                "`model.fit(callbacks=[monitor])` first."
            )
        health = self.unit_health
        return diagnose_records(
            records,
            self._context,
            units=self._units,
            update_ratios=(health.update_ratios or None) if health else None,
            weight_norms=health.weight_norms if health else None,
            dead_criterion=self._dead_criterion(),
            notes=self._notes,
        )

    # -- callback hooks ---------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        backend.require("GradientHealthMonitor", PROBE_BACKENDS)
        model = self.model
        check_trainable(model)
        self._notes = []
        if self.logger is not None:
            logger = self.logger
            if (
                logger.model is not model
                or logger.records is None
                or len(logger.records)
            ):
                raise ValueError(
                    "The `logger` given to GradientHealthMonitor must also be in "
                    "`callbacks`, placed before the monitor: "
                    "`fit(callbacks=[logger, monitor])`."
                )
        else:
            # Weight norms come from the probes: computing them at every step
            # would be half of the logger's cost.
            kept = self._kept_logger
            if kept is None or kept.model is not model:
                kept = GradientNormLogger(
                    self.every_n_steps, self.layers, weight_norms=False
                )
                kept.set_model(model)
                kept._label = "GradientHealthMonitor"
                kept._advice = (
                    "Or diagnose the model on a fixed batch: "
                    "`kgrad.diagnose(model, x, loss_fn=...)`."
                )
            self._own_logger = self._kept_logger = kept
            kept.set_params(self.params)
            kept.on_train_begin(logs)
        self._pending = []
        self._units = None
        self._rows_seen: dict[str, int] = {}
        self._summaries: dict = {}
        self._last_bucket = -1
        self._batches_begun = 0
        self._batches_done = 0
        self._summary = None
        self._log = FindingLog()
        self._judge_seconds: float | None = None  # the last diagnosis's duration
        self._trained_seconds = 0.0  # epochs' time since the last diagnosis
        self._epoch_start = time.perf_counter()
        # Steps are counted on the host: the optimizer the step uses is known only
        # once it ran (a GAN's step never calls `model.optimizer`).
        self._epoch_first_step = int(model.optimizer.iterations.numpy())
        self._probe = None
        self.unit_health = None
        if model_is_built(model):
            self._start_probes()

    def _start_probes(self, first_step: int | None = None) -> None:
        """Makes the probe and the unit statistics: once the model is built.

        Args:
            first_step: The first step the unit statistics cover. Defaults to
                `None`: the step after the epoch's last finished one.
        """
        model = self.model
        x = self._probe_inputs()
        tracked = track_variables(model, self.layers)
        kept = self._kept_probe
        # Probe data of the shapes the kept probe reads fit its model (one forward
        # pass, checked at an earlier fit()).
        checked = (
            x is not None
            and kept is not None
            and kept.input_signature == input_signature(x)
            and kept.serves(model, tracked, x)
        )
        if x is not None and not checked:
            check_probe_data(model, (x, None), "probe_data")
            reason = functional_reason(model)
            if reason is not None:
                self._notes.append(reason)
                warnings.warn(
                    f"GradientHealthMonitor: {reason}",
                    GradientHealthWarning,
                    stacklevel=3,
                )
                x = None
        self._context = network_context(model)
        if kept is not None and (checked or kept.serves(model, tracked, x)):
            kept.restart(x, self.probe_batch_size, self.dead_after_probes)
        else:
            kept = UnitProbe(
                model,
                tracked,
                x,
                batch_size=self.probe_batch_size,
                window=self.dead_after_probes,
            )
        self._probe = self._kept_probe = kept
        self._probe_batches = self._probe.batch_count
        self.unit_health = UnitHealth(
            self._probe.site_infos,
            self._probe.layers,
            self.dead_after_probes,
            first_step=(
                self._epoch_first_step + self._steps_run()
                if first_step is None
                else first_step
            ),
        )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_first_step += self._steps_run()
        self._batches_begun = self._batches_done = 0
        if self._own_logger is not None:
            self._own_logger.on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        # The probe after step s runs before step s + 1, on the main thread: in
        # Keras's asynchronous batch-end thread it would compete with the training
        # step for the weights and the cores (measured: 3x its own cost), and on JAX
        # it would read the state that step s + 1 donates.
        self._batches_begun = batch + 1
        if batch > 0 and self._probe is None:  # a model built by its first step
            self._start_probes(first_step=self._epoch_first_step + batch)
        if batch > 0 and self._probe is not None:
            self._probe_if_due(self._epoch_first_step + batch - 1)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # Async-safe: nothing here reads the model (on JAX that syncs the state the
        # next step is donating).
        self._batches_done = batch + 1
        if self._own_logger is not None:
            self._own_logger.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._trained_seconds += time.perf_counter() - self._epoch_start
        if self._own_logger is not None:
            self._own_logger.on_epoch_end(epoch, logs)
        if self._batches_begun and self._probe is None:  # built by its only step
            self._start_probes()
        if self._batches_begun and self._probe is not None:
            # The probe due after the epoch's last step.
            last = self._epoch_first_step + self._steps_run() - 1
            self._probe_if_due(max(last, self._epoch_first_step))
        new = self._judge() if self._judge_due() else []
        if logs is not None:
            summary = self._summary
            units = self.unit_health.health_values()
            logs.update(
                {
                    "health/decay": np.nan if summary is None else summary.decay,
                    "health/first_to_last": (
                        np.nan if summary is None else summary.first_to_last
                    ),
                    "health/dead_fraction": units["dead_fraction"],
                    "health/saturated_fraction": units["saturated_fraction"],
                    "health/findings": float(len(new)),
                }
            )

    def on_train_end(self, logs: dict | None = None) -> None:
        try:
            if self._own_logger is not None:
                self._own_logger.on_train_end(logs)
            if self._probe is not None:
                self._judge()
        finally:
            if self._own_logger is not None:
                self._records = self._own_logger.records
                self._records_by_optimizer = dict(
                    self._own_logger.records_by_optimizer
                )
            self._own_logger = None
            self._probe = None
            self._pending = []

    # -- internals --------------------------------------------------------------------

    def _steps_run(self) -> int:
        """The steps of this epoch so far. The batch-end hook may run on Keras's
        worker thread and lag behind (a race seen on JAX); the batch-begin hook
        counts executions, not steps, under `steps_per_execution`: the larger."""
        return max(self._batches_begun, self._batches_done)

    def _probe_inputs(self) -> Any:
        data = self.probe_data
        if isinstance(data, tuple) and len(data) in (2, 3):
            return data[0]
        return data

    def _dead_criterion(self) -> str:
        """How a dead unit was established, for the findings."""
        probes = f"{self.dead_after_probes} probes in a row"
        if self._probe_batches == 1:
            return probes
        return f"{probes} of {self.probe_batch_size} examples each"

    def _probe_if_due(self, step: int) -> None:
        """Probes now if no probe ran yet in the bucket of `step` (just finished)."""
        bucket = step // self.probe_every_n_steps
        if bucket > self._last_bucket:
            self._last_bucket = bucket
            self._pending.append((step, self._probe()))

    def _judge_due(self) -> bool:
        """Whether the epoch-end diagnosis fits the time budget (or cannot wait)."""
        if self.max_judge_share is None or self._judge_seconds is None:
            return True
        if self._trained_seconds * self.max_judge_share >= self._judge_seconds:
            return True
        # Non-finite gradients are news that cannot wait.
        return any(
            not np.isfinite(records.global_norms[self._rows_seen.get(name, 0) :]).all()
            for name, records in self.records_by_optimizer.items()
            if len(records) > self._rows_seen.get(name, 0)
        )

    def _judge(self) -> list[Finding]:
        """Runs the detectors on what arrived since the last call; announces news."""
        start = time.perf_counter()
        findings = self._run_detectors()
        for finding in findings:
            if self._log.add(finding):
                self._announce(finding)
        self._judge_seconds = time.perf_counter() - start
        self._trained_seconds = 0.0
        return findings

    def _run_detectors(self) -> list[Finding]:
        """The findings on what arrived since the last call."""
        findings: list[Finding] = []
        by_optimizer = self.records_by_optimizer
        for name, records in by_optimizer.items():
            seen = self._rows_seen.get(name, 0)
            if len(records) <= seen:
                continue
            found, summary = gradient_findings(
                records,
                self._context,
                start=seen,
                spike_factor=self.spike_factor,
                spike_window=self.spike_window,
            )
            if len(by_optimizer) > 1:
                # A vanishing generator is a finding of its own.
                for finding in found:
                    finding.evidence["optimizer"] = name
                    finding.message = f"({name}) {finding.message}"
            if self._summary is None or name == next(iter(by_optimizer)):
                self._summary = summary
            findings += found
            self._rows_seen[name] = len(records)
        if self._probe is None:
            return findings
        pending, self._pending = self._pending, []
        for step, result in sorted(pending, key=lambda item: item[0]):
            self.unit_health.add(step, *self._probe.decode(result))
        if self.unit_health.close_interval():
            step = self.unit_health.last_step
            units = self.unit_health.table()
            dead_masks = self.unit_health.dead_masks()
            units["dead_bias_mean"] = self._probe.dead_bias_means(dead_masks)
            # What the correlation of the inputs explains (REFERENCES.md, trap 3).
            fractions, counts = self._probe.null_silent_fractions(dead_masks)
            units["null_silent_fraction"], units["null_units"] = fractions, counts
            self._units = units
            criterion = self._dead_criterion()
            findings += unit_findings(
                units, self._context, step=step, criterion=criterion
            )
            stalled = stalled_beyond_trend(
                self.unit_health.update_ratios,
                findings,
                context=self._context,
                step=step,
            )
            findings += [stalled] if stalled is not None else []
        return findings

    def _announce(self, finding: Finding) -> None:
        text = f"GradientHealthMonitor: {finding.summary()}"
        if finding.fixes:
            text += f"\n  Fix: {finding.fixes[0]}"
        if self.verbose:
            print(text)
        else:
            warnings.warn(text, GradientHealthWarning, stacklevel=3)
