"""`ZooHyperModel`: the shared part of zoo's hypermodels: space, compile, a guarded `fit`.

`declare_hyperparameters` declares the whole space, batch size included; keras-tuner calls
it before it creates the first trial, so trial 0 samples every dimension (a
hyperparameter first met inside `fit` would only vary from trial 1 on).

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
from zoo.tuning import trial_health
from zoo.tuning.search_space import Rule, SearchSpace

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


def space_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The searchable arguments among a constructor's `locals()`."""
    return {k: v for k, v in arguments.items() if k not in _NOT_SPACE}


def positive_int(name: str):
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
        # Built now, the optimizer's slots are in the checkpoints, so Hyperband restores
        # them with the weights when it continues a trial (else Keras skips them).
        optimizer.build(model.trainable_variables)
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
            callbacks.insert(
                0, kgrad.LearningRateWarmup(warmup_epochs=values["warmup_epochs"])
            )
        found = _tuner_of(callbacks)
        history = model.fit(*args, batch_size=batch_size, callbacks=callbacks, **kwargs)
        if found is None:
            return trial_health.summarize_run(history, logger.records)
        tuner, trial = found
        return trial_health.summarize_run(
            history, logger.records, trial_dir=tuner.get_trial_dir(trial.trial_id),
            objective=tuner.oracle.objective, tuner_id=tuner.tuner_id,
        )

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
