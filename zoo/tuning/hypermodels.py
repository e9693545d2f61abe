"""`HyperMLP` and `HyperCNN`: keras-tuner hypermodels over zoo's builders.

Both declare their whole space, batch size included, in `declare_hyperparameters`, which
keras-tuner calls before it creates the first trial: so trial 0 samples every dimension
(a hyperparameter first met inside `fit` would only vary from trial 1 on). Each argument
takes a fixed value, a list of choices, a `(min, max)` range or a keras-tuner
hyperparameter object (see `zoo.tuning.search_space`).

In every trial `fit` attaches a `kgrad.GradientNormLogger` (a fresh one, unless
`search(callbacks=[...])` holds one, which keras-tuner deep-copies per trial) and stores
the gradient health of the run as trial metrics (`zoo.tuning.trial_health`). A run whose
loss, metrics or gradients become NaN or inf stops at the end of that epoch and is scored
with the worst finite value (0.0 for a maximized objective such as `val_accuracy`, 1e9
for a minimized one such as `val_loss`) and `diverged=1`: the trial completes, so a run of
divergent trials does not hit `max_consecutive_failed_trials`. The reason goes to
`zoo_trial.json` in the trial directory; `zoo.tuner_results` reads it back.

Batch size: the hypermodel's `batch_size` decides. A `batch_size` passed to `search()` is
ignored with a one-time warning, unless the hypermodel was given `batch_size=None`
(leave batching to Keras or to a `tf.data` input), in which case it is used as is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import keras
import keras_tuner

import kgrad
from zoo.builders import _checks
from zoo.builders.cnn import build_cnn
from zoo.builders.mlp import build_mlp
from zoo.tuning import trial_health
from zoo.tuning.search_space import DEFAULT, Rule, SearchSpace

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "rmsprop", "nadam", "adamax", "lion")
"""The optimizer names the hypermodels accept."""


def _check_learning_rate(value: Any) -> None:
    if not _checks.is_real_in(value, 0.0, math.inf, include_low=False):
        raise ValueError(
            f"`learning_rate` must be a float > 0. Received: learning_rate={value!r}"
        )


def _check_off_or_at_least(name: str, minimum: float, integer: bool):
    def check(value: Any) -> None:
        if value is None:
            return
        valid = (
            _checks.is_int_at_least(value, minimum)
            if integer
            else _checks.is_real_in(value, minimum, math.inf)
        )
        if not valid:
            kind = "an integer" if integer else "a float"
            raise ValueError(
                f"`{name}` must be None or {kind} >= {minimum} (0 or None turns it off). "
                f"Received: {name}={value!r}"
            )

    return check


TRAINING_RULES: dict[str, Rule] = {
    "learning_rate": Rule(_check_learning_rate, "float_log", (1e-4, 1e-1)),
    "batch_size": Rule(
        lambda v: v is None or _checks.check_int(v, "batch_size"), "int_doubling",
        [32, 64, 128, 256],
    ),
    "optimizer": Rule(lambda v: _checks.check_choice(v, "optimizer", OPTIMIZERS), None,
                      "adam"),
    "clip_threshold": Rule(_check_off_or_at_least("clip_threshold", 0.0, False), "float",
                           None),
    "warmup_epochs": Rule(_check_off_or_at_least("warmup_epochs", 0, True), "int", None),
}
"""Rules of the arguments every hypermodel shares (training, not architecture)."""

BLOCK_RULES: dict[str, Rule] = {
    "block": Rule(lambda v: _checks.check_choice(v, "block", _checks.BLOCKS), None,
                  list(_checks.BLOCKS)),
    "activation": Rule(_checks.check_activation, None, ["relu", "gelu", "tanh", "sigmoid"]),
    "kernel_initializer": Rule(_checks.check_initializer, None,
                               ["auto", "glorot_uniform", "he_normal"]),
    "dropout": Rule(_checks.check_dropout, "float", [0.0, 0.1, 0.2]),
    "l2": Rule(_checks.check_l2, "float", 0.0),
}
"""Rules of the block arguments that `build_mlp` and `build_cnn` share."""


_NOT_SPACE = frozenset({"self", "__class__", "input_shape", "num_classes", "name", "tunable"})


def _space_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The searchable arguments among a constructor's `locals()`."""
    return {k: v for k, v in arguments.items() if k not in _NOT_SPACE}


def _positive_int(name: str):
    return lambda value: _checks.check_int(value, name)


class ZooHyperModel(keras_tuner.HyperModel):
    """The shared part of `HyperMLP` and `HyperCNN`: space, compile and a guarded `fit`.

    Subclasses set `ARCHITECTURE_RULES` and implement `build_model(values)`.
    """

    ARCHITECTURE_RULES: ClassVar[dict[str, Rule]] = {}
    INPUT_RANK: ClassVar[int | None] = None

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        space: dict[str, Any],
        name: str | None = None,
        tunable: bool = True,
    ):
        super().__init__(name=name, tunable=tunable)
        self.input_shape = _checks.check_input_shape(input_shape, self.INPUT_RANK)
        self.num_classes = _checks.check_int(num_classes, "num_classes", minimum=2)
        self.space = SearchSpace({**self.ARCHITECTURE_RULES, **TRAINING_RULES}, space)
        self._warned_batch_size = False

    def declare_hyperparameters(self, hp: keras_tuner.HyperParameters) -> None:
        """Declares every dimension, so that trial 0 samples batch size too."""
        self.space.declare(hp)

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """Builds and compiles the model of one trial (Adam-like optimizer, sparse CE)."""
        values = self.space.declare(hp)
        model = self.build_model(values)
        optimizer = keras.optimizers.get(
            {"class_name": values["optimizer"],
             "config": {"learning_rate": float(values["learning_rate"])}}
        )
        model.compile(
            optimizer=optimizer,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model

    def build_model(self, values: dict[str, Any]) -> keras.Model:
        raise NotImplementedError

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args, **kwargs):
        """Trains one trial with gradient logging; scores a diverged run, never fails it.

        Args:
            hp: The trial's hyperparameters.
            model: The model from `build`.
            *args: Positional arguments of `search()`, passed on to `model.fit`.
            **kwargs: Keyword arguments of `search()`; `batch_size` is replaced by the
                hyperparameter (see the module docstring).

        Returns:
            The `History`, with the gradient-health metrics added as constant columns, or
            for a diverged run a dict of worst metrics and `diverged=1.0`.
        """
        values = self.space.declare(hp)
        batch_size = self._batch_size(values["batch_size"], kwargs.pop("batch_size", None))
        callbacks = list(kwargs.pop("callbacks", None) or [])
        logger = next(
            (c for c in callbacks if isinstance(c, kgrad.GradientNormLogger)), None
        )
        if logger is None:
            logger = kgrad.GradientNormLogger()
            callbacks.insert(0, logger)
        callbacks.insert(0, trial_health.StopOnDivergence())
        if values["clip_threshold"]:
            callbacks.insert(0, kgrad.GradientClipping(threshold=values["clip_threshold"]))
        if values["warmup_epochs"]:
            callbacks.insert(0, kgrad.LearningRateWarmup(warmup_epochs=values["warmup_epochs"]))
        tuner = _tuner_of(callbacks)
        history = model.fit(*args, batch_size=batch_size, callbacks=callbacks, **kwargs)
        if tuner is None:
            return summarize_run(history, logger.records, None, None)
        tuner, trial = tuner
        return summarize_run(history, logger.records, tuner.get_trial_dir(trial.trial_id),
                             tuner.oracle.objective, tuner_id=tuner.tuner_id)

    def _batch_size(self, declared: int | None, searched: int | None) -> int | None:
        if declared is None:
            return searched
        if searched is not None and searched != declared and not self._warned_batch_size:
            self._warned_batch_size = True
            warnings.warn(
                f"`batch_size={searched}` passed to `search()` is ignored: the batch size "
                f"is a hyperparameter of {type(self).__name__} (this trial: {declared}). "
                f"To fix it, pass `batch_size={searched}` to {type(self).__name__}(...).",
                stacklevel=3,
            )
        return declared


def _tuner_of(callbacks: list) -> tuple[Any, Any] | None:
    """`(tuner, trial)` from keras-tuner's per-trial callback, or None outside a search."""
    for callback in callbacks:
        tuner, trial = getattr(callback, "tuner", None), getattr(callback, "trial", None)
        if tuner is not None and trial is not None and hasattr(tuner, "get_trial_dir"):
            return tuner, trial
    return None


def summarize_run(history, records, trial_dir: str | None, objective: Any,
                  tuner_id: str | None = None):
    """What `fit` returns to keras-tuner for one run, and the trial file it writes.

    Args:
        history: The `History` of the run.
        records: The `GradientRecords` of the run's logger, or None.
        trial_dir: The trial directory to write `zoo_trial.json` into, or None.
        objective: The tuner's objective (for the direction of the worst score), or None.
        tuner_id: The id of the tuner process that ran it (`chief`, `tuner0`, ...), kept
            in the trial file. Defaults to `None`.

    Returns:
        The `History` with constant health columns, or a dict of worst metrics for a
        diverged run.
    """
    health = trial_health.gradient_health(records)
    divergence = trial_health.find_divergence(history.history, history.epoch, records)
    if trial_dir is not None:
        trial_health.append_execution(trial_dir, {
            "epochs": list(history.epoch),
            "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "reason": None if divergence is None else divergence.reason,
            "tuner_id": tuner_id,
        })
    if divergence is None:
        for name, value in {**health, **trial_health.NOT_DIVERGED}.items():
            history.history[name] = [value] * len(history.epoch)
        return history
    directions = dict(getattr(objective, "name_to_direction", None) or {})
    if objective is not None and not directions:
        directions[objective.name] = objective.direction
    names = [k for k in history.history if not k.startswith("grad_norm/")]
    names += [k for k in directions if k not in names and k != "default_objective"]
    worst = trial_health.worst_metrics(names, directions)
    return {**worst, **health, **divergence.metrics()}


class HyperMLP(ZooHyperModel):
    """A keras-tuner hypermodel of `zoo.build_mlp` classifiers.

    Every searchable argument takes a fixed value, a list of choices, a `(min, max)` range
    or a keras-tuner hyperparameter object; the defaults below form the default space.

    Args:
        input_shape: Shape of one example, e.g. `(64,)` for digits.
        num_classes: Number of classes, >= 2.
        depth: Hidden blocks. Defaults to `(2, 16)`: every integer from 2 to 16.
        width: Units per block. Defaults to `[16, 32, 64, 128]`; a range doubles.
        block: Block types. Defaults to all of `zoo.BLOCKS`.
        activation: Hidden activations. Defaults to `["relu", "gelu", "tanh", "sigmoid"]`.
        kernel_initializer: Defaults to `["auto", "glorot_uniform", "he_normal"]`.
        dropout: Defaults to `[0.0, 0.1, 0.2]`.
        l2: Defaults to `0.0` (fixed).
        learning_rate: Defaults to `(1e-4, 1e-1)`, log-uniform.
        batch_size: Defaults to `[32, 64, 128, 256]`; a range doubles; `None` leaves it
            to `search(batch_size=...)` or Keras.
        optimizer: One of `OPTIMIZERS`. Defaults to `"adam"` (fixed).
        clip_threshold: Global-norm clipping with `kgrad.GradientClipping`; 0 or None is
            off. Defaults to `None` (off, not a hyperparameter).
        warmup_epochs: Linear warm-up with `kgrad.LearningRateWarmup`; 0 or None is off.
            Defaults to `None`.
        name: The hypermodel's name. Defaults to `None`.
        tunable: keras-tuner's flag: whether the space may grow in `build`. Defaults to
            `True`.

    Raises:
        ValueError: For an impossible space: a range with min > max, an unknown block,
            activation, initializer or optimizer among the choices, a value out of range.

    Example:

    >>> hypermodel = HyperMLP((64,), 10, depth=(2, 8), block=["plain", "residual"],
    ...                       batch_size=[32, 128])
    >>> tuner = keras_tuner.RandomSearch(hypermodel, "val_accuracy", max_trials=4,
    ...                                  seed=7)  # doctest: +SKIP
    >>> tuner.search(x, y, validation_split=0.2, epochs=3)  # doctest: +SKIP
    >>> zoo.tuner_results(tuner)  # doctest: +SKIP
    """

    ARCHITECTURE_RULES = {
        "depth": Rule(_positive_int("depth"), "int", (2, 16)),
        "width": Rule(_positive_int("width"), "int_doubling", [16, 32, 64, 128]),
        **BLOCK_RULES,
    }

    def __init__(self, input_shape: Sequence[int], num_classes: int, *,
                 depth: Any = DEFAULT, width: Any = DEFAULT, block: Any = DEFAULT,
                 activation: Any = DEFAULT, kernel_initializer: Any = DEFAULT,
                 dropout: Any = DEFAULT, l2: Any = DEFAULT, learning_rate: Any = DEFAULT,
                 batch_size: Any = DEFAULT, optimizer: Any = DEFAULT,
                 clip_threshold: Any = DEFAULT, warmup_epochs: Any = DEFAULT,
                 name: str | None = None, tunable: bool = True):
        super().__init__(input_shape, num_classes, _space_arguments(locals()), name=name,
                         tunable=tunable)

    def build_model(self, values: dict[str, Any]) -> keras.Model:
        return build_mlp(
            self.input_shape, self.num_classes, depth=values["depth"],
            width=values["width"], block=values["block"], activation=values["activation"],
            kernel_initializer=values["kernel_initializer"], dropout=values["dropout"],
            l2=values["l2"],
        )


class HyperCNN(ZooHyperModel):
    """A keras-tuner hypermodel of `zoo.build_cnn` classifiers.

    Stage `s` (0-based) has `filters * 2**s` channels; the other arguments are as in
    `HyperMLP`, and take the same kinds of values.

    Args:
        input_shape: `(height, width, channels)`, e.g. `(8, 8, 1)` for digits as images.
        num_classes: Number of classes, >= 2.
        stages: Number of stages. Defaults to `2` (fixed).
        filters: Channels of the first stage. Defaults to `[8, 16, 32]`.
        blocks_per_stage: Blocks in every stage. Defaults to `(1, 3)`.
        kernel_size: Defaults to `3` (fixed).
        block, activation, kernel_initializer, dropout, l2, learning_rate, batch_size,
        optimizer, clip_threshold, warmup_epochs, name, tunable: As in `HyperMLP`.

    Raises:
        ValueError: For an impossible space, as `HyperMLP`, or an `input_shape` that is
            not an image shape.

    Example:

    >>> hypermodel = HyperCNN((8, 8, 1), 10, blocks_per_stage=(1, 2), filters=8)
    >>> sorted(hypermodel.space.dimensions)[:3]
    ['activation', 'batch_size', 'block']
    """

    INPUT_RANK = 3
    ARCHITECTURE_RULES = {
        "stages": Rule(_positive_int("stages"), "int", 2),
        "filters": Rule(_positive_int("filters"), "int_doubling", [8, 16, 32]),
        "blocks_per_stage": Rule(_positive_int("blocks_per_stage"), "int", (1, 3)),
        "kernel_size": Rule(_positive_int("kernel_size"), "int", 3),
        **BLOCK_RULES,
    }

    def __init__(self, input_shape: Sequence[int], num_classes: int, *,
                 stages: Any = DEFAULT, filters: Any = DEFAULT,
                 blocks_per_stage: Any = DEFAULT, kernel_size: Any = DEFAULT,
                 block: Any = DEFAULT, activation: Any = DEFAULT,
                 kernel_initializer: Any = DEFAULT, dropout: Any = DEFAULT,
                 l2: Any = DEFAULT, learning_rate: Any = DEFAULT, batch_size: Any = DEFAULT,
                 optimizer: Any = DEFAULT, clip_threshold: Any = DEFAULT,
                 warmup_epochs: Any = DEFAULT, name: str | None = None,
                 tunable: bool = True):
        super().__init__(input_shape, num_classes, _space_arguments(locals()), name=name,
                         tunable=tunable)

    def build_model(self, values: dict[str, Any]) -> keras.Model:
        return build_cnn(
            self.input_shape, self.num_classes,
            filters=[values["filters"] * 2**stage for stage in range(values["stages"])],
            blocks_per_stage=values["blocks_per_stage"], kernel_size=values["kernel_size"],
            block=values["block"], activation=values["activation"],
            kernel_initializer=values["kernel_initializer"], dropout=values["dropout"],
            l2=values["l2"],
        )
