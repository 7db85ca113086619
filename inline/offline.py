"""``inline run``: a chain in-process, without sockets, on a raw-data file.

The same :class:`~inline.engine.ChainRunner` the server uses, so a journal replayed
offline gives the same images, bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ismrmrd

from inline.allocator import tune_process
from inline.config import ChainSpec, apply_overrides, validate_chain
from inline.engine import ChainRunner
from inline.gadget import SessionContext
from inline.latency import LatencySummary
from inline.mrdfile import RawScan
from inline.protocol import parse_header
from inline.qc.alert import Alert
from inline.spans import SpanRecorder
from inline.trace import Trace, now_ns

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Images, texts and QC alerts a chain produced offline, with its latency summary."""

    images: list[ismrmrd.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    summary: LatencySummary | None = None


def run_chain(
    spec: ChainSpec,
    scan: RawScan,
    parameters: dict[str, Any] | None = None,
    queue_size: int = 64,
    spans: SpanRecorder | None = None,
    tap_host: Any = None,
) -> RunResult:
    """Run ``spec`` over ``scan``; with ``spans``, record every gadget call there (:mod:`inline.spans`);
    with ``tap_host`` (:class:`inline.tap_process.TapHost`), run the QC taps in its workers as the server does.

    Raises:
        ConfigError: the chain does not validate.
        GadgetError: a gadget failed.
        InvalidHeader: the scan's header is not valid ISMRMRD.
    """
    tune_process()
    header = parse_header(scan.header_xml)
    spec, unused = apply_overrides(spec, parameters or {})
    if unused:
        log.info("parameters not used by any gadget: %s", ", ".join(unused))
    result = RunResult()
    latencies: list[int] = []

    def sink(item: Any, trace: Trace) -> None:
        if isinstance(item, ismrmrd.Image):
            latencies.append(now_ns() - trace.last_arrival_ns)
            result.images.append(item)
        elif isinstance(item, str):
            result.texts.append(str(item))
        elif isinstance(item, Alert):
            result.alerts.append(item)

    stages = validate_chain(spec)
    if spans is not None:
        spans.bind(spec.name, [(s.name, s.cls.__name__) for s in stages])
    runner = ChainRunner(
        stages, SessionContext(header=header, config_name=spec.name), sink, queue_size=queue_size,
        on_span=None if spans is None else spans.stage_span, tap_host=tap_host,
    )
    runner.start()
    try:
        for item in scan.items:
            runner.put(item, Trace.arrived())
    finally:
        runner.close()
    result.summary = LatencySummary.build(latencies, runner.times)
    return result
