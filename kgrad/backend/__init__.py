"""The few operations of the step hook that each Keras backend does its own way.

Keras keeps every backend's code in a folder of its own with the same function names
(`keras/src/backend/{tensorflow,jax,torch}/`) and writes the rest once against
`keras.ops`. kgrad does the same: `kgrad.backend.tensorflow`, `kgrad.backend.jax` and
`kgrad.backend.torch` expose the same functions (the strategy of a model, state
variables that the traced step writes, row writes, aggregation of replica gradients),
and `current()` picks the one of `keras.backend.backend()`. Only these modules import
`tensorflow`, `jax` or `torch` for the step hook; what works on which backend is
listed in `SUPPORT`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import keras

# What each backend supports, for messages: the callbacks and functions that work there.
SUPPORT = {
    "tensorflow": "every kgrad callback and function",
    "jax": (
        "GradientNormLogger (every option, on the real training step or in probe "
        "mode), GradientHealthMonitor, GradientClipping (every mode), `diagnose` "
        "and `probe_gradients`, and the records, plots and reports made from them"
    ),
    "torch": (
        "GradientNormLogger (every option, on the real training step or in probe "
        "mode), GradientHealthMonitor, GradientClipping (every mode), "
        "EarlyStopping, LearningRateWarmup and WarmupSchedule, `diagnose` and "
        "`probe_gradients`, the zoo's builders and searches, and the records, "
        "plots and reports made from them"
    ),
}


def name() -> str:
    """The Keras backend in use (`"tensorflow"`, `"jax"`, `"torch"`, ...)."""
    return keras.backend.backend()


def current() -> ModuleType:
    """The backend module of kgrad for the Keras backend in use.

    Raises:
        NotImplementedError: on a backend that kgrad does not support yet.
    """
    backend = name()
    module = _MODULES.get(backend)
    if module is None:
        if backend not in SUPPORT:
            raise NotImplementedError(unsupported_message("kgrad's step hook", backend))
        module = _MODULES[backend] = importlib.import_module(f"kgrad.backend.{backend}")
    return module


# The modules imported so far, by backend: `current()` runs inside the step, where a
# dict lookup is all that `torch.compile` traces (it cannot trace an import).
_MODULES: dict[str, ModuleType] = {}


def unsupported_message(feature: str, backend: str | None = None) -> str:
    """A message for `feature` used on a backend where it does not work yet."""
    backend = backend or name()
    works = SUPPORT.get(backend, "nothing of kgrad's gradient capture yet")
    return (
        f"{feature} does not support Keras's {backend!r} backend yet. What works "
        f"there: {works}. Everything works on the TensorFlow backend: set "
        "`KERAS_BACKEND=tensorflow` before importing Keras."
    )


def require(feature: str, backends: tuple[str, ...] = ("tensorflow",)) -> None:
    """Raises a clear error when `feature` is used on a backend outside `backends`.

    Called at `on_train_begin` (or on entry of a function), before any training step.

    Raises:
        NotImplementedError: naming the backend, what works there and the way out.
    """
    if name() not in backends:
        raise NotImplementedError(unsupported_message(feature))
