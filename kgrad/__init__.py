"""kgrad: see and fix vanishing and exploding gradients from inside `model.fit`.

The public names are re-exported here; the modules behind them are private.
"""

from kgrad import records, stats
from kgrad import diagnosis, plots
from kgrad.callbacks.gradient_health_monitor import (
    GradientHealthMonitor,
    GradientHealthWarning,
)
from kgrad.callbacks.gradient_norm_logger import GradientNormLogger
from kgrad.capture.probe import probe_gradients
from kgrad.capture.step_hook import StepContext, StepHook
from kgrad.capture.variables import TrackedVariable, track_variables
from kgrad.control import (
    EarlyStopping,
    GradientClipping,
    LearningRateWarmup,
    WarmupSchedule,
)
from kgrad.diagnosis import Finding, Report, diagnose, diagnose_records
from kgrad.records.gradient_records import GradientRecords

__version__ = "0.1.0"

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
