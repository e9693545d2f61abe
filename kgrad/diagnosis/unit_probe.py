"""A cheap periodic probe during training: unit activity and how far the weights moved.

Called every `probe_every_n_steps` steps by `GradientHealthMonitor`, it (a) passes a
batch of probe examples through a functional sub-model (the probe set in turn, a batch
at a time), returning which ReLU-family units fired and the saturated fraction of each
sigmoid/tanh site, and (b) measures ‖w − w_prev‖ and ‖w‖ per layer against a device
copy of the weights taken at the previous probe. Both happen in one call, compiled by
the backend (`UnitStatistics`: a `tf.function`, or `jax.jit` at the current step's
weights), that returns a few small tensors, read at `decode` (at the end of the epoch).
The monitor keeps its probe from one `fit()` to the next on the same model
(`serves`, `restart`): a new one would be traced and compiled again (~0.4 s on JAX
for a 20-layer MLP).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from kgrad import backend
from kgrad.capture.probe import check_forward_pass
from kgrad.capture.variables import TrackedVariable
from kgrad.diagnosis.activations import activation_sites
from kgrad.diagnosis.graph import LayerReader
from kgrad.diagnosis.null_units import (
    GaussianUnits,
    has_null_model,
    null_active_units_of_layers,
    null_units_layer,
)
from kgrad.diagnosis.fixes import DEAD_PRONE
from kgrad.diagnosis.saturation import DERIVATIVE_THRESHOLD
from kgrad.diagnosis.unit_health import SiteInfo

# Fewer null units than `diagnose` uses: computed once per epoch during training, and
# 256 units pin the null fraction to about ±0.03.
PROBE_NULL_UNITS = 256


def probe_batches(x: Any, batch_size: int | None) -> list[Any]:
    """`x` cut into batches of `batch_size` examples, taken in turn.

    Every batch has `batch_size` examples, so that one trace serves them all: the last
    one wraps around to the first examples. Together the batches hold every example.

    Args:
        x: Inputs (an array or a structure of arrays), examples on the first axis.
        batch_size: Examples per batch, or `None` for one batch of all of `x`.

    Returns:
        The batches, as structures of tensors like `x`.

    Example:

    >>> batches = probe_batches(np.arange(5.0)[:, None], 2)
    >>> [keras.ops.convert_to_numpy(b).ravel().tolist() for b in batches]
    [[0.0, 1.0], [2.0, 3.0], [4.0, 0.0]]
    """
    count = int(np.shape(keras.tree.flatten(x)[0])[0])
    if batch_size is None or batch_size >= count:
        return [keras.tree.map_structure(ops.convert_to_tensor, x)]

    def batch(start: int) -> Any:
        rows = np.arange(start, start + batch_size) % count
        return keras.tree.map_structure(
            lambda value: ops.convert_to_tensor(np.take(np.asarray(value), rows, axis=0)),
            x,
        )

    return [batch(start) for start in range(0, count, batch_size)]


def input_signature(x: Any) -> Any:
    """The shape and dtype of each array of `x`, in its structure (`None` for none).

    Example:

    >>> input_signature({"a": np.zeros((2, 3), "float32")})
    {'a': ((2, 3), 'float32')}
    """
    if x is None:
        return None
    return keras.tree.map_structure(
        lambda value: (tuple(np.shape(value)), _dtype_name(value)), x
    )


def _dtype_name(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is None:  # a list or a number
        return np.asarray(value).dtype.name
    return keras.backend.standardize_dtype(dtype)


def _tracked_key(tracked: Sequence[TrackedVariable]) -> list[tuple[str, int]]:
    # Identity, not equality: a Keras variable's `==` is elementwise.
    return [(item.layer, id(item.variable)) for item in tracked]


def _site_key(site: Any) -> tuple:
    """What the probe's trace reads of a site: its layers, activation and tensors."""
    return (
        id(site.layer),
        site.activation,
        id(site.kernel_layer),
        site.normalized,
        id(site.output),
        id(site.kernel_input),
    )


class UnitProbe:
    """Unit activity on probe batches, and weight movement since the last probe.

    Each call passes the next batch of the probe set (`batch_size` examples, in turn):
    a forward pass costs in proportion to its examples, and a unit silent in several
    probes in a row has then been silent on that many different batches.

    Args:
        model: The model being trained.
        tracked: The tracked variables (grouped into layers for the update ratios).
        x: Probe inputs, or `None` to measure weight movement only (also when the
            model has no functional graph: pass `x=None` then).
        batch_size: Examples per probe, or `None` for all of `x` at every probe.
            Defaults to `None`.
        window: The null model of dead units reads the examples of this many last
            probes (those a dead unit was silent on). Defaults to `1`.

    Raises:
        ValueError: if `x` is given and the model has no `call()` (a GAN or VAE
            of keras-io's kind): the message names its sub-models. Pass `x=None`
            for weight movement only.

    Example:

    >>> tracked = kgrad.track_variables(model)  # doctest: +SKIP
    >>> probe = UnitProbe(model, tracked, x_probe)  # doctest: +SKIP
    >>> result = probe()  # doctest: +SKIP
    >>> active, saturated, deltas, weights = probe.decode(result)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: keras.Model,
        tracked: Sequence[TrackedVariable],
        x: Any = None,
        batch_size: int | None = None,
        window: int = 1,
    ):
        if x is not None:
            check_forward_pass(model, "probe_data")
        self._model = model
        self._tracked = _tracked_key(tracked)
        self.layers = list(dict.fromkeys(item.layer for item in tracked))
        self._groups = [
            [item.variable for item in tracked if item.layer == layer]
            for layer in self.layers
        ]
        self.sites = activation_sites(model) if x is not None else []
        # The null model of dead units reads each ReLU site's kernel input; the probe
        # returns those inputs too, and keeps those of the last `window` probes.
        # Its layers are built only once a site has dead units.
        self._null_sites = [
            index
            for index, site in enumerate(self.sites)
            if site.activation in DEAD_PRONE
            and site.kernel_input is not None
            and not site.normalized
            and has_null_model(site.kernel_layer)
        ]
        self._null_layers: dict[int, keras.Layer | GaussianUnits] = {}
        self._reader = (
            LayerReader(
                model,
                [site.output for site in self.sites]
                + [self.sites[i].kernel_input for i in self._null_sites],
            )
            if self.sites
            else None
        )
        # The forward pass and the weights' movement since the previous probe, in one
        # call compiled by the backend (the weights of the previous probe stay on the
        # device there).
        self._variables = [variable for group in self._groups for variable in group]
        self._measure = backend.current().UnitStatistics(
            model,
            self._statistics,
            self._variables,
            [layer for layer, group in enumerate(self._groups) for _ in group],
        )
        self._start(x, batch_size, window)

    def _start(self, x: Any, batch_size: int | None, window: int) -> None:
        """Probing starts over: from the first batch of `x`, with no recent probe."""
        self._batches = [None] if x is None else probe_batches(x, batch_size)
        # What the probe data's checks and traces depend on.
        self.input_signature = input_signature(x)
        self._next_batch = 0
        # (batch index, kernel inputs) of the last `window` probes.
        self._recent: collections.deque[tuple[int, list[Any]]] = collections.deque(
            maxlen=window
        )
        self._null_cache: dict[int, tuple[bytes, float]] = {}

    def serves(
        self, model: keras.Model, tracked: Sequence[TrackedVariable], x: Any = None
    ) -> bool:
        """Whether this probe, compiled for its model, can probe these again.

        True for the same model with the same tracked variables (the same objects,
        in the same layers) and the same activation sites in the same graph, with
        probe inputs when this probe has them, and without when it has none.
        Their values may differ: the probe reads them at each call.

        Args:
            model: The model to probe.
            tracked: The tracked variables.
            x: The probe inputs, or `None`.
        """
        if model is not self._model or (x is None) != (self.input_signature is None):
            return False
        if _tracked_key(tracked) != self._tracked:
            return False
        sites = activation_sites(model) if x is not None else []
        return len(sites) == len(self.sites) and all(
            _site_key(new) == _site_key(old) for new, old in zip(sites, self.sites)
        )

    def restart(
        self, x: Any = None, batch_size: int | None = None, window: int = 1
    ) -> None:
        """Starts probing over (a new `fit()`), keeping what is compiled.

        The next probe measures the weights' movement from their values now, takes
        the first batch of `x` and has no recent probes for the null model: as a new
        `UnitProbe` would, with no new trace. Call only when `serves(...)` holds.

        Args:
            x: Probe inputs (of the shapes this probe was built with, or the probe
                is traced again for the new ones), or `None`.
            batch_size: Examples per probe, or `None` for all of `x`. Defaults to
                `None`.
            window: Probes the null model of dead units reads. Defaults to `1`.
        """
        self._measure.reset()
        self._start(x, batch_size, window)

    def _statistics(self, x: Any) -> tuple[Any, Any, list[Any]]:
        """The forward part of the probe: site statistics and kernel inputs.

        Returns small tensors only (besides the kernel inputs of the null model):
        which units fired at every ReLU-family site, concatenated; the saturated
        fraction of every sigmoid/tanh site.
        """
        active, saturated, kernel_inputs = [], [], []
        if self._reader is not None:
            outputs, _ = self._reader(x, training=False)
            kernel_inputs = outputs[len(self.sites) :]
            for site, output in zip(self.sites, outputs):
                flat = ops.cast(ops.reshape(output, (-1, output.shape[-1])), "float32")
                if site.activation in DEAD_PRONE:
                    # ReLU and ReLU6 outputs are never negative: a unit fired for
                    # some example exactly when its largest output is positive.
                    active.append(ops.max(flat, axis=0) > 0)
                else:
                    derivative = (
                        flat * (1.0 - flat)
                        if site.activation == "sigmoid"
                        else 1.0 - flat**2
                    )
                    below = ops.cast(derivative < DERIVATIVE_THRESHOLD, "float32")
                    saturated.append(ops.mean(below))
        return (
            ops.concatenate(active, 0) if active else ops.zeros((0,), "bool"),
            ops.stack(saturated) if saturated else ops.zeros((0,)),
            list(kernel_inputs),
        )

    def __call__(self) -> tuple[Any, ...]:
        """Runs the probe.

        One compiled call computes everything on the device and returns small
        tensors (read at `decode`, at the end of the epoch).

        Returns:
            The probe's statistics, for `decode`.
        """
        index = self._next_batch
        self._next_batch = (index + 1) % len(self._batches)
        forward, deltas, weights = self._measure(self._batches[index])
        active, saturated, kernel_inputs = forward
        if kernel_inputs:
            self._recent.append((index, kernel_inputs))
        return active, saturated, deltas, weights

    @property
    def batch_count(self) -> int:
        """How many batches the probe set is cut into (1 when it is probed whole)."""
        return len(self._batches)

    def null_inputs(self, index: int) -> Any | None:
        """The kernel inputs of null site `index` (a position in the sites) on the
        examples of the last `window` probes: each batch once, as last probed (the
        examples a dead unit was silent on); `None` before any probe."""
        position = self._null_sites.index(index)
        latest = {batch: inputs[position] for batch, inputs in self._recent}
        if not latest:
            return None
        parts = list(latest.values())
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)

    @property
    def site_infos(self) -> list[SiteInfo]:
        """The probed sites, described by plain values."""
        return [
            SiteInfo(site.name, site.owner, site.activation, site.units)
            for site in self.sites
        ]

    def null_silent_fractions(
        self, dead: Sequence[np.ndarray | None]
    ) -> tuple[list[float], list[float]]:
        """Per site, the fraction of null-model units silent on the last probes'
        inputs, and how many null units estimated it.

        Fresh zero-bias random units reading each ReLU site's kernel input (see
        `kgrad.diagnosis.dead_units`): what the geometry of the inputs explains. 0
        after a normalization layer (it centres every unit; exact, so no count); NaN
        where unknown (sigmoid/tanh sites, no kernel layer, no dead units). Computed
        only for sites with dead units, and again only when their set of dead units
        changes.

        Args:
            dead: Per site, the boolean mask of dead units, or `None`.

        Returns:
            The fractions and the null-unit counts (NaN where no estimate).
        """
        fractions = [
            0.0 if site.normalized and site.activation in DEAD_PRONE else float("nan")
            for site in self.sites
        ]
        counts = [float("nan")] * len(self.sites)
        estimated, due = [], {}
        for index in self._null_sites:
            mask = dead[index]
            if mask is None or not mask.any() or not self._recent:
                continue
            estimated.append(index)
            key = np.packbits(mask).tobytes()
            if self._null_cache.get(index, (None,))[0] != key:
                due[index] = key
        if due:
            if not self._null_layers:  # built once a site has dead units
                self._null_layers = {
                    index: null_units_layer(
                        self.sites[index].kernel_layer, units=PROBE_NULL_UNITS
                    )
                    for index in self._null_sites
                }
            # Every Dense site comes along with those due: the sites with inputs of
            # one shape share one batched product, whose shapes then stay the same
            # from call to call (on JAX an eager operation is compiled anew for each
            # new shape, ~0.15 s; the product of 20 sites takes ~5 ms).
            together = [
                index
                for index in self._null_sites
                if index in due or isinstance(self._null_layers[index], GaussianUnits)
            ]
            active = null_active_units_of_layers(
                [self._null_layers[index] for index in together],
                [self.null_inputs(index) for index in together],
            )
            for index, fired in zip(together, active):
                if index in due:
                    self._null_cache[index] = (due[index], float(np.mean(~fired)))
        for index in estimated:
            fractions[index] = self._null_cache[index][1]
            counts[index] = float(PROBE_NULL_UNITS)
        return fractions, counts

    def dead_bias_means(self, dead: Sequence[np.ndarray | None]) -> list[float]:
        """The mean bias of the dead units of each site (NaN where unknown).

        Args:
            dead: Per site, the boolean mask of dead units, or `None`.
        """
        means = []
        for site, mask in zip(self.sites, dead):
            bias = getattr(site.kernel_layer, "bias", None)
            if mask is None or not mask.any() or bias is None or site.normalized:
                means.append(float("nan"))
                continue
            # The copy taken at the last probe, which found the units dead.
            values = self._measure.previous(bias)
            means.append(float(np.mean(values[mask])))
        return means

    def decode(
        self, result: tuple[Any, ...]
    ) -> tuple[list[np.ndarray | None], list[float | None], np.ndarray, np.ndarray]:
        """Unpacks a probe result.

        Returns:
            Per site: the boolean activity of each unit (ReLU family) or `None`; per
            site: the saturated fraction (sigmoid/tanh) or `None`; the weight-change
            norms per layer; the weight norms per layer.
        """
        active_units, fractions, deltas, weights = (np.asarray(r) for r in result)
        active, saturated = [], []
        offset, position = 0, 0
        for site in self.sites:
            if site.activation in DEAD_PRONE:
                active.append(active_units[offset : offset + site.units])
                saturated.append(None)
                offset += site.units
            else:
                active.append(None)
                saturated.append(float(fractions[position]))
                position += 1
        return active, saturated, deltas, weights
