"""`Finding`: one diagnosed problem, where it is, the numbers behind it, the fixes."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

FindingKind = Literal[
    "vanishing", "exploding", "non_finite", "dead_units", "saturation", "stalled"
]
Severity = Literal["info", "warning", "critical"]

FINDING_KINDS: tuple[str, ...] = FindingKind.__args__
SEVERITIES: tuple[str, ...] = Severity.__args__


@dataclasses.dataclass
class Finding:
    """One problem found in the gradients or activations of a model.

    Attributes:
        kind: What is wrong: `"vanishing"`, `"exploding"` (growth across depth or a
            spike over time), `"non_finite"` (NaN or inf gradients), `"dead_units"`,
            `"saturation"` (sigmoid/tanh units with derivative below 0.01) or
            `"stalled"` (weights that barely move).
        severity: `"info"`, `"warning"` or `"critical"`.
        layers: The layers concerned, in depth order (empty when the finding is
            about the whole network, such as a spike of the global norm).
        evidence: The numbers the verdict rests on, by name.
        fixes: Remedies that fit the evidence, most specific first.
        step: The training step the finding was made at; `None` outside training.
        message: A one-line statement of the finding.
    """

    kind: FindingKind
    severity: Severity
    layers: list[str]
    evidence: dict[str, Any]
    fixes: list[str]
    step: int | None = None
    message: str = ""

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """`(kind, layers)`: what identifies the same finding seen again later."""
        return self.kind, tuple(self.layers)

    def summary(self) -> str:
        """The finding in one line: severity, kind, where and when, and the message."""
        where = f" at step {self.step}" if self.step is not None else ""
        return f"[{self.severity}] {self.kind}{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The finding as plain Python values (for JSON)."""
        return dataclasses.asdict(self)


def layer_span(layers: list[str]) -> str:
    """A short description of a list of layers: `a`, `a, b` or `a … z (n layers)`."""
    if not layers:
        return "the whole network"
    if len(layers) <= 3:
        return ", ".join(layers)
    return f"{layers[0]} … {layers[-1]} ({len(layers)} layers)"


class FindingLog:
    """Every finding made during a run, with its step, and which ones are news.

    A trend across depth (vanishing, growth) or a spike is one story however the layers
    it names shift from one epoch to the next; dead, saturated, stalled or non-finite
    layers are news when a layer not named before appears. Findings whose evidence
    names another `optimizer` are other stories.

    Example:

    >>> log = FindingLog()
    >>> log.add(Finding("dead_units", "warning", ["d1"], {}, [], step=4))
    True
    >>> log.add(Finding("dead_units", "warning", ["d1"], {}, [], step=9))
    False
    >>> len(log.findings)
    2
    """

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self._named: dict[tuple[str, Any, Any], set[str]] = {}

    def add(self, finding: Finding) -> bool:
        """Keeps `finding`; returns whether it is news (to be announced)."""
        self.findings.append(finding)
        signal = finding.evidence.get("signal")
        trend = finding.kind == "vanishing" or signal in ("depth_growth", "norm_spike")
        # Each optimizer's gradients tell their own story (a GAN's generator and
        # discriminator): a vanishing generator is news after a vanishing discriminator.
        group = (finding.kind, signal, finding.evidence.get("optimizer"))
        named = self._named.get(group)
        if named is not None and (trend or set(finding.layers) <= named):
            return False
        self._named.setdefault(group, set()).update(finding.layers)
        return True
