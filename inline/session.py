"""One scan: a connection's messages, its chain, its journal, its replies.

Handshake (as python-ismrmrd-server and Gadgetron expect): CONFIG_FILE or CONFIG_TEXT,
optionally a TEXT ``{"parameters": {...}}`` (OpenRecon) and QUERY messages, HEADER, then
acquisitions/waveforms, then CLOSE. Replies are IMAGE, TEXT and CLOSE only (RESPONSE
only to a QUERY), the set both reference clients accept.

Errors are caught here and nowhere deeper: bad input (:class:`~inline.protocol.ProtocolError`),
a bad config (:class:`~inline.config.ConfigError`) or a failing gadget
(:class:`~inline.engine.GadgetError`) each end the session with ``ERROR   ...`` TEXT then
CLOSE, and a log line. After a gadget failure the rest of the stream is still read into
the journal, so no raw data is lost.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ismrmrd

from inline.config import ChainSpec, ConfigError, apply_overrides, config_search_path, load_chain, parse_chain, validate_chain
from inline.engine import ChainRunner, GadgetError
from inline.gadget import SessionContext, Text, text_message
from inline.journal import Journal
from inline.latency import LatencySummary
from inline.protocol import (
    CLOSE,
    MessageId,
    MessageReader,
    MessageWriter,
    ProtocolError,
    answer_query,
)
from inline.qc.alert import Alert, AlertCode, AlertFactory, Severity
from inline.qc.bus import AlertLog
from inline.spans import SEND_STAGE, SpanRecorder
from inline.trace import Trace, now_ns

log = logging.getLogger(__name__)

#: Image meta key with the image's latency from its last readout's arrival to its send [ms].
LATENCY_META_KEY = "InlineLatencyAfterLastReadout_ms"
#: Image meta key listing the QC alert codes known for the image's slice/repetition when it was sent.
ALERTS_META_KEY = "InlineQCAlerts"

_counter = itertools.count(1)


def new_session_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}_{next(_counter):04d}_{secrets.token_hex(2)}"


@dataclass
class SessionSettings:
    """Server-wide settings every session uses.

    Attributes:
        config_dirs: extra directories searched for config names (before ``configs/``).
        journal_dir: where raw streams are journaled; None disables journaling.
        max_message_bytes: largest message accepted [bytes].
        queue_size: bound of each inter-gadget queue [messages].
        idle_timeout_s: a peer silent this long mid-message is dropped [s].
        on_image: optional callback ``(session_id, image, latency_ms)`` for live views.
        bus: the process's alert bus (:class:`inline.qc.bus.AlertBus`), or None.
        alert_log_dir: where each session's alerts go as ``<session>.alerts.jsonl``;
            None: the journal directory; no log when both are None.
        metrics: the process's :class:`inline.metrics.ServerMetrics`, or None.
        trace_dir: where each session's per-message spans go as ``<session>.trace.json`` and
            ``<session>.chrome.json`` (:mod:`inline.spans`); None: no spans recorded.
        tap_host: the process's :class:`inline.tap_process.TapHost`: QC taps run in its
            worker processes; None: on threads of this process.
    """

    config_dirs: list[Path] = field(default_factory=list)
    journal_dir: Path | None = None
    max_message_bytes: int = 512 * 2**20
    queue_size: int = 64
    idle_timeout_s: float | None = 300.0
    on_image: Callable[[str, ismrmrd.Image, float], None] | None = None
    bus: Any = None
    alert_log_dir: Path | None = None
    metrics: Any = None
    trace_dir: Path | None = None
    tap_host: Any = None


class SessionError(RuntimeError):
    """The client broke the handshake (e.g. data before HEADER or before a config)."""


class Session:
    """Serve one connection until CLOSE, EOF or an error. Use :meth:`run` (blocking)."""

    def __init__(self, sock: socket.socket, settings: SessionSettings, session_id: str | None = None):
        self.sock = sock
        self.settings = settings
        self.id = session_id or new_session_id()
        self.log = logging.LoggerAdapter(log, {"session": self.id})
        self.reader = MessageReader(sock, max_message_bytes=settings.max_message_bytes, idle_timeout_s=settings.idle_timeout_s)
        self.writer = MessageWriter(sock)
        self.journal = Journal(settings.journal_dir, self.id) if settings.journal_dir else None
        self.spec: ChainSpec | None = None
        self.config_label = ""
        self.overrides: dict[str, Any] = {}
        self.header_xml: str | None = None
        self.header = None
        self.runner: ChainRunner | None = None
        self.latencies_ns: list[int] = []
        self.images_sent = 0
        self.dropped: dict[str, int] = {}
        self.error: str | None = None
        self.summary: LatencySummary | None = None
        self._client_gone = False
        self._send_lock = threading.Lock()
        self.alerts: list[Alert] = []
        self._alert_lock = threading.Lock()
        log_dir = settings.alert_log_dir or settings.journal_dir
        self.alert_log = AlertLog(Path(log_dir) / f"{self.id}.alerts.jsonl") if log_dir else None
        self.alert_factory: AlertFactory | None = None
        self._chain_budget_overrun = False
        self.acquisitions_received = 0
        self.spans = SpanRecorder(self.id) if settings.trace_dir is not None else None

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> None:
        self.log.info("session %s: connection from %s", self.id, _peer(self.sock))
        if self.settings.metrics is not None:
            self.settings.metrics.session_started(self)
        try:
            self._serve()
        except (ProtocolError, ConfigError, SessionError, GadgetError) as e:
            self._fail(e)
        except Exception as e:  # a bug of ours: still tell the scanner, keep the server up
            self.log.exception("session %s: internal error", self.id)
            self._fail(e)
        finally:
            if self.runner is not None:
                self.runner.abort()
            if self.journal is not None:
                try:
                    self.journal.close()
                except Exception:
                    self.log.exception("session %s: journal conversion failed (the .mrd stream is kept)", self.id)
            if self.alert_log is not None:
                self.alert_log.close()
            if self.alert_factory is not None:
                self._event("event.session.end", images=self.images_sent, alerts=len(self.alerts), error=self.error)
            self.log.info("session %s: ended (%d images, %d messages received)", self.id, self.images_sent, self.reader.messages_received)
            if self.spans is not None and self.runner is not None:
                try:
                    self.spans.write_dir(self.settings.trace_dir)
                except OSError as e:
                    self.log.warning("session %s: cannot write its trace: %s", self.id, e)
            if self.settings.metrics is not None:
                self.settings.metrics.session_ended(self)

    def _serve(self) -> None:
        while (msg := self.reader.read()) is not None:
            msg_id, obj = msg
            if msg_id == MessageId.ACQUISITION:
                self.acquisitions_received += 1
            if msg_id == MessageId.CLOSE:
                self._finish()
                return
            if self.error is not None:
                self._drain(msg_id, obj)
                continue
            try:
                self._dispatch(msg_id, obj)
            except (ConfigError, SessionError, GadgetError) as e:
                # reported now; the scanner may still be streaming: keep its raw data
                self._fail(e)
        if self.reader.messages_received:
            self.log.warning("session %s: peer disconnected without CLOSE", self.id)
        self._client_gone = True
        self._finish()

    def _drain(self, msg_id: MessageId, obj: Any) -> None:
        """After an error: journal what still arrives, reconstruct nothing."""
        if msg_id in (MessageId.ACQUISITION, MessageId.WAVEFORM, MessageId.HEADER):
            self._record(obj)

    def _dispatch(self, msg_id: MessageId, obj: Any) -> None:
        if msg_id in (MessageId.ACQUISITION, MessageId.WAVEFORM, MessageId.IMAGE, MessageId.NDARRAY):
            trace = Trace.arrived()
            if msg_id in (MessageId.ACQUISITION, MessageId.WAVEFORM):
                self._record(obj)
            if self.runner is None:
                self._start_chain()
            if self.runner.failed:
                return  # reported by _fail; _serve drains the rest into the journal
            self.runner.put(obj, trace)
        elif msg_id == MessageId.CONFIG_FILE:
            self._record(obj)
            self.spec = load_chain(obj.name, config_search_path(self.settings.config_dirs))
            self.config_label = obj.name
            self._note(config=obj.name)
        elif msg_id == MessageId.CONFIG_TEXT:
            self._record(obj)
            self.spec = parse_chain(obj.text, origin="CONFIG_TEXT")
            self.config_label = f"{self.spec.name} (CONFIG_TEXT)"
            self._note(config_text=obj.text)
        elif msg_id == MessageId.HEADER:
            self.header = obj.parse()
            self.header_xml = obj.xml
            self._record(obj)
        elif msg_id == MessageId.TEXT:
            self._text(obj)
        elif msg_id == MessageId.QUERY:
            self.writer.send_response(obj.correlation_id, answer_query(obj.query))
        else:
            raise SessionError(f"unexpected {msg_id.name} message from the client")

    def _record(self, obj: Any) -> None:
        if self.journal is not None:
            self.journal.record(obj)

    def _note(self, **info: Any) -> None:
        if self.journal is not None:
            self.journal.note_config(**info)

    def _text(self, text: str) -> None:
        if self.runner is None:
            try:
                doc = json.loads(text)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("parameters"), dict):
                self._record(Text(text))
                self.overrides.update(doc["parameters"])
                self._note(parameters=self.overrides)
                self.log.info("session %s: parameters %s", self.id, doc["parameters"])
                return
        self.log.info("session %s: client text: %s", self.id, text.strip())

    # -- chain -----------------------------------------------------------------------------
    def _start_chain(self) -> None:
        if self.header is None:
            raise SessionError("data arrived before the HEADER message")
        overrides = dict(self.overrides)
        config = overrides.pop("config", None)
        if isinstance(config, str) and config and self.spec is None:
            self.spec = load_chain(config, config_search_path(self.settings.config_dirs))
            self.config_label = config
        if self.spec is None:
            raise SessionError("data arrived before a CONFIG_FILE or CONFIG_TEXT message")
        spec, unused = apply_overrides(self.spec, overrides)
        if unused:
            self.log.info("session %s: parameters not used by any gadget: %s", self.id, ", ".join(unused))
        stages = validate_chain(spec)
        context = SessionContext(header=self.header, session_id=self.id, config_name=spec.name, log=logging.getLogger(f"inline.session.{self.id}"))
        self.budget_ms = spec.budget_ms
        self.alert_factory = AlertFactory(context)
        on_span = None
        if self.spans is not None:
            self.spans.bind(spec.name, [(s.name, s.cls.__name__) for s in stages])
            on_span = self.spans.stage_span
        self.runner = ChainRunner(
            stages, context, self._sink, queue_size=self.settings.queue_size, on_error=self._fail, on_budget=self._stage_over_budget,
            on_span=on_span, tap_host=self.settings.tap_host,
        ).start()
        self._event("event.session.start", config=self.config_label, peer=_peer(self.sock))
        self.log.info("session %s: chain %s: %s", self.id, self.config_label, " -> ".join(s.name for s in stages))

    def _sink(self, item: Any, trace: Trace) -> None:
        """Last stop of the chain (runs on the last worker thread)."""
        if self._client_gone:
            return
        try:
            if isinstance(item, ismrmrd.Image):
                self._send_image(item, trace)
            elif isinstance(item, Alert):
                self.raise_alert(item)
            elif isinstance(item, str):
                self.writer.send_text(item)
            else:
                name = type(item).__name__
                if name not in self.dropped:
                    self.log.debug("session %s: %s reached the end of the chain; not sent", self.id, name)
                self.dropped[name] = self.dropped.get(name, 0) + 1
        except OSError as e:
            self.log.warning("session %s: client went away while sending: %s", self.id, e)
            self._client_gone = True

    def _send_image(self, image: ismrmrd.Image, trace: Trace) -> None:
        meta = ismrmrd.Meta.deserialize(image.attribute_string) if image.attribute_string else ismrmrd.Meta()
        codes = self._alerts_for(image)
        if codes:
            meta[ALERTS_META_KEY] = codes
        latency_ns = now_ns() - trace.last_arrival_ns
        meta[LATENCY_META_KEY] = f"{latency_ns / 1e6:.3f}"
        image.attribute_string = meta.serialize()
        t_send = now_ns()
        self.writer.send_image(image)
        if self.spans is not None:
            self.spans.span(SEND_STAGE, "Session", "Image", t_send, now_ns() - t_send)
        self.latencies_ns.append(latency_ns)
        self.images_sent += 1
        latency_ms = latency_ns / 1e6
        if self.budget_ms is not None and latency_ms > self.budget_ms and not self._chain_budget_overrun:
            self._chain_budget_overrun = True
            if self.settings.metrics is not None:
                self.settings.metrics.budget_overrun(self.runner.context.config_name, "chain")
            self.raise_alert(
                self.alert_factory.make(
                    AlertCode.LATENCY_BUDGET,
                    Severity.WARNING,
                    f"Reconstruction late in series {self.alert_factory.series}: image {image.image_index} "
                    f"(slice {image.slice}) took {latency_ms:.0f} ms after its last readout, budget {self.budget_ms:.0f} ms.",
                    "Images will arrive late; scanning can continue. Tell the physicist if it persists.",
                    revealed_ns=trace.last_arrival_ns,
                    slices=[image.slice],
                    repetition=image.repetition,
                    value=latency_ms,
                    threshold=self.budget_ms,
                    unit="ms",
                    evidence={"image_index": image.image_index},
                )
            )
        self._event(
            "event.image",
            series_index=image.image_series_index,
            image_index=image.image_index,
            slice=image.slice,
            repetition=image.repetition,
            latency_ms=latency_ms,
            matrix=[int(m) for m in image.matrix_size],
            alerts=codes,
        )
        if self.settings.on_image is not None:
            self.settings.on_image(self.id, image, latency_ms)

    # -- alerts and events ---------------------------------------------------------------
    def raise_alert(self, alert: Alert, send_text: bool = True) -> None:
        """Publish a QC alert: bus, JSONL log, TEXT to the scanner, meta of later images."""
        alert.latency_ms = (now_ns() - alert.revealed_ns) / 1e6 if alert.revealed_ns else None
        record = alert.to_record()
        with self._alert_lock:
            self.alerts.append(alert)
        if self.settings.bus is not None:
            self.settings.bus.publish(alert.topic, record)
        if self.alert_log is not None:
            self.alert_log.write(record)
        self.log.warning("session %s: alert %s: %s", self.id, alert.code.value, alert.message)
        if send_text:
            self._send_safely(Text(alert.to_text()))

    def _alerts_for(self, image: ismrmrd.Image) -> list[str]:
        """Codes of the alerts that concern this image (its slice and repetition, or the series)."""
        with self._alert_lock:
            alerts = list(self.alerts)
        return sorted(
            {
                a.code.value
                for a in alerts
                if (not a.slices or image.slice in a.slices) and (a.repetition is None or a.repetition == image.repetition)
            }
        )

    def _stage_over_budget(self, stage: str, took_ms: float, budget_ms: float) -> None:
        if self.settings.metrics is not None:
            self.settings.metrics.budget_overrun(self.runner.context.config_name if self.runner else "", "stage", stage)
        self.raise_alert(
            self.alert_factory.make(
                AlertCode.LATENCY_BUDGET,
                Severity.WARNING,
                f"Reconstruction slow in series {self.alert_factory.series}: stage {stage!r} took {took_ms:.0f} ms "
                f"on one message, budget {budget_ms:.0f} ms.",
                "Images may arrive late; scanning can continue. Tell the physicist if it persists.",
                revealed_ns=now_ns(),
                value=took_ms,
                threshold=budget_ms,
                unit="ms",
                evidence={"stage": stage},
            )
        )

    def _event(self, topic: str, **payload: Any) -> None:
        if self.settings.bus is None:
            return
        factory = self.alert_factory
        base = {"session": self.id, "time_unix_s": time.time()}
        if factory is not None:
            base.update(scanner=factory.scanner, series=factory.series)
        self.settings.bus.publish(topic, {**base, **payload})

    # -- endings ---------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.runner is not None and self.runner.failed:
            self._fail(self.runner.error)
            return
        if self.runner is not None:
            try:
                self.runner.close()
            except GadgetError as e:
                self._fail(e)
                return
            summary = LatencySummary.build(self.latencies_ns, self.runner.times)
            self.summary = summary
            self.log.info("session %s: %s", self.id, summary.format())
            self._send_safely(text_message("INFO", summary.format()))
        if not self._client_gone and self.error is None:
            self._send_safely(CLOSE)

    def _fail(self, error: BaseException) -> None:
        with self._send_lock:  # reader thread and a failing worker may both get here
            if self.error is not None:
                return
            self.error = f"{type(error).__name__}: {error}"
        self.log.error("session %s: %s", self.id, self.error)
        if self.runner is not None:
            self.runner.abort()
        # a chain that ran and broke (a gadget, or a bug of ours) is a recon failure; bad input is not
        if self.alert_factory is not None and not isinstance(error, (ProtocolError, ConfigError, SessionError)):
            journal = f" Raw data are kept ({self.journal.stream_path.name})." if self.journal is not None else ""
            self.raise_alert(
                self.alert_factory.make(
                    AlertCode.RECON_FAILURE,
                    Severity.CRITICAL,
                    f"Reconstruction failed in series {self.alert_factory.series}: {error}.{journal}",
                    "Images of this series will not arrive inline: continue or repeat the series, and tell the physicist.",
                    revealed_ns=now_ns(),
                    evidence={"error": self.error},
                ),
                send_text=False,  # the ERROR text below says it to the scanner
            )
        self._send_safely(text_message("ERROR", str(error)))
        self._send_safely(CLOSE)

    def _send_safely(self, obj: Any) -> None:
        if self._client_gone:
            return
        try:
            self.writer.send(obj)
        except OSError as e:
            self.log.warning("session %s: cannot send to client: %s", self.id, e)
            self._client_gone = True


def _peer(sock: socket.socket) -> str:
    try:
        return "%s:%s" % sock.getpeername()[:2]
    except (OSError, TypeError):
        return "?"
