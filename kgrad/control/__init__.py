"""Training control that acts on the real step: early stopping, warm-up, clipping."""

from kgrad.control.clipping import CLIP_MODES, GradientClipping
from kgrad.control.early_stopping import EarlyStopping
from kgrad.control.warmup import LearningRateWarmup
from kgrad.control.warmup_schedule import WarmupSchedule, warmup_curve

__all__ = [
    "CLIP_MODES",
    "EarlyStopping",
    "GradientClipping",
    "LearningRateWarmup",
    "WarmupSchedule",
    "warmup_curve",
]
