"""The alert model: what a QC check tells the radiographer, in one typed record.

An alert says what is wrong (``code`` from a fixed vocabulary), how bad (``severity``),
where (session, scanner, series, slices, repetition), the measured ``value`` against its
``threshold``, a ``message`` a radiographer can act on with a suggested ``action``, and the
``evidence`` (metric values) behind it. The same record goes on the alert bus (msgpack),
into the session's JSONL log, to the scanner as TEXT and, summarised, into image meta.
Schema for other languages: ``docs/alerts.md``.
"""

from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def text_level(self) -> str:
        """FIRE-style TEXT level prefix for the scanner."""
        return {"info": "INFO", "warning": "WARNING", "critical": "ERROR"}[self.value]


class AlertCode(str, Enum):
    """Fixed vocabulary of alert codes (extend here, never with free text)."""

    RF_SPIKE = "rf_spike"
    COIL_DROPOUT = "coil_dropout"
    COIL_NOISE = "coil_noise"
    MOTION = "motion"
    LOW_SNR = "low_snr"
    GHOSTING = "ghosting"
    INCOMPLETE_COVERAGE = "incomplete_coverage"
    LATENCY_BUDGET = "latency_budget"
    RECON_FAILURE = "recon_failure"


class Alert(BaseModel):
    """One QC finding.

    Attributes:
        id: unique id (UUID4 hex).
        time_unix_s: when the alert was raised [s since the epoch, UTC].
        detected_ns: monotonic time of detection [ns, ``inline.trace.now_ns`` clock].
        revealed_ns: arrival of the message that revealed the fault [ns, same clock]; the
            alert latency is ``published - revealed``.
        session: session id; scanner: scanner identity from the header.
        series: series label (protocol / measurement id) and image_series_index where known.
        slices: affected slice indices; repetition: affected repetition, when one.
        severity, code: see :class:`Severity`, :class:`AlertCode`.
        value, threshold, unit: the measured metric against its threshold.
        message: what happened, for the radiographer; action: what to do about it.
        evidence: the metric values behind the finding (JSON-serialisable).
        latency_ms: from the arrival of the revealing readout to publication on the bus
            [ms]; set by the session when it publishes.
    """

    model_config = ConfigDict(use_enum_values=False)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time_unix_s: float = Field(default_factory=time.time)
    detected_ns: int = 0
    revealed_ns: int = 0
    session: str = ""
    scanner: str = ""
    series: str = ""
    slices: list[int] = Field(default_factory=list)
    repetition: int | None = None
    severity: Severity
    code: AlertCode
    value: float | None = None
    threshold: float | None = None
    unit: str = ""
    message: str
    action: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    latency_ms: float | None = None

    @property
    def topic(self) -> str:
        """Bus topic ``alert.<severity>.<code>``: subscribers filter by prefix."""
        return f"alert.{self.severity.value}.{self.code.value}"

    def to_text(self) -> str:
        """The TEXT message for the scanner: level prefix, code, message, action."""
        return f"{self.severity.text_level:<8}[{self.code.value}] {self.message} {self.action}".rstrip()

    def to_record(self) -> dict[str, Any]:
        """Plain dict (str enums) for msgpack and JSON."""
        return self.model_dump(mode="json")

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Alert":
        return cls.model_validate(record)


def slice_label(slices: list[int]) -> str:
    """``[12, 13, 14, 18]`` -> ``"slices 12-14, 18"`` (ISMRMRD slice indices)."""
    if not slices:
        return ""
    s = sorted(set(slices))
    runs, start, prev = [], s[0], s[0]
    for v in s[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ("slice " if len(s) == 1 else "slices ") + ", ".join(runs)


class AlertFactory:
    """Builds alerts of one session with its identity filled in.

    Args:
        context: the gadget's :class:`inline.gadget.SessionContext` (session id, header).
    """

    def __init__(self, context: Any):
        self.session = context.session_id
        header = context.header
        asi = getattr(header, "acquisitionSystemInformation", None)
        mi = getattr(header, "measurementInformation", None)
        parts = [getattr(asi, "systemVendor", None), getattr(asi, "systemModel", None), getattr(asi, "stationName", None)]
        self.scanner = " ".join(str(p) for p in parts if p) or "unknown scanner"
        protocol = getattr(mi, "protocolName", None) if mi is not None else None
        measurement = getattr(mi, "measurementID", None) if mi is not None else None
        self.series = " / ".join(str(p) for p in (protocol, measurement) if p) or "series"

    def make(
        self,
        code: AlertCode | str,
        severity: Severity | str,
        message: str,
        action: str,
        *,
        revealed_ns: int,
        slices: list[int] | None = None,
        repetition: int | None = None,
        value: float | None = None,
        threshold: float | None = None,
        unit: str = "",
        evidence: dict[str, Any] | None = None,
    ) -> Alert:
        from inline.trace import now_ns

        return Alert(
            detected_ns=now_ns(),
            revealed_ns=revealed_ns,
            session=self.session,
            scanner=self.scanner,
            series=self.series,
            slices=list(slices or []),
            repetition=repetition,
            severity=Severity(severity),
            code=AlertCode(code),
            value=None if value is None else float(value),
            threshold=None if threshold is None else float(threshold),
            unit=unit,
            message=message,
            action=action,
            evidence=evidence or {},
        )
