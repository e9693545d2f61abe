"""Gradient-health diagnosis: detectors, `diagnose`, `Report`.

The detectors are pure functions over arrays and DataFrames (one concept per module);
`diagnose` measures a model on a probe set and runs them; `diagnose_records` runs the
gradient detectors on recorded norms.
"""

from kgrad.diagnosis.dead_units import detect_dead_units
from kgrad.diagnosis.diagnose import diagnose
from kgrad.diagnosis.exploding import detect_exploding, detect_spikes
from kgrad.diagnosis.findings import Finding
from kgrad.diagnosis.fixes import NetworkContext, fixes_for
from kgrad.diagnosis.from_records import diagnose_records, gradient_findings
from kgrad.diagnosis.non_finite import detect_non_finite
from kgrad.diagnosis.report import Report
from kgrad.diagnosis.saturation import detect_saturation
from kgrad.diagnosis.stalled import detect_stalled
from kgrad.diagnosis.vanishing import detect_vanishing

__all__ = [
    "Finding",
    "NetworkContext",
    "Report",
    "detect_dead_units",
    "detect_exploding",
    "detect_non_finite",
    "detect_saturation",
    "detect_spikes",
    "detect_stalled",
    "detect_vanishing",
    "diagnose",
    "diagnose_records",
    "fixes_for",
    "gradient_findings",
]
