"""kgrad: see and fix vanishing and exploding gradients from inside `model.fit`.

The public names are re-exported here; the modules behind them are private.

The names are loaded on first use (PEP 562 `__getattr__`): `import kgrad` alone does not
import TensorFlow, so `kgrad --help` and `kgrad --version` answer at once. The first
public name used imports all of them together, as an eager import would, so that
`kgrad.WarmupSchedule` is registered with Keras's serialization before any model that
holds one is loaded.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. A name added to `__all__` without an entry
# here must be imported eagerly below `__all__` (it then costs the import at once).
_PUBLIC = {
    "EarlyStopping": "kgrad.control",
    "Finding": "kgrad.diagnosis",
    "GradientClipping": "kgrad.control",
    "GradientHealthMonitor": "kgrad.callbacks.gradient_health_monitor",
    "GradientHealthWarning": "kgrad.callbacks.gradient_health_monitor",
    "GradientNormLogger": "kgrad.callbacks.gradient_norm_logger",
    "GradientRecords": "kgrad.records.gradient_records",
    "LearningRateWarmup": "kgrad.control",
    "Report": "kgrad.diagnosis",
    "StepContext": "kgrad.capture.step_hook",
    "StepHook": "kgrad.capture.step_hook",
    "TrackedVariable": "kgrad.capture.variables",
    "WarmupSchedule": "kgrad.control",
    "diagnose": "kgrad.diagnosis",
    "diagnose_records": "kgrad.diagnosis",
    "probe_gradients": "kgrad.capture.probe",
    "track_variables": "kgrad.capture.variables",
}
# Subpackages reachable as attributes (`kgrad.control.CLIP_MODES`), as they were after
# the eager import of the names above.
_SUBMODULES = (
    "callbacks",
    "capture",
    "cli",
    "control",
    "diagnosis",
    "plots",
    "records",
    "stats",
)

__all__ = [
    "EarlyStopping",
    "Finding",
    "GradientClipping",
    "GradientHealthMonitor",
    "GradientHealthWarning",
    "GradientNormLogger",
    "GradientRecords",
    "LearningRateWarmup",
    "Report",
    "StepContext",
    "StepHook",
    "TrackedVariable",
    "WarmupSchedule",
    "diagnose",
    "diagnose_records",
    "diagnosis",
    "plots",
    "probe_gradients",
    "records",
    "stats",
    "track_variables",
]


def _load_public_names() -> None:
    for name, module in _PUBLIC.items():
        globals()[name] = getattr(importlib.import_module(module), name)


def __getattr__(name: str):
    # A subpackage imports only itself: the modules of kgrad run
    # `from kgrad import stats` while they are being imported.
    if name in _SUBMODULES:
        return importlib.import_module(f"kgrad.{name}")
    if name in _PUBLIC:
        _load_public_names()
        return globals()[name]
    raise AttributeError(f"module 'kgrad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
