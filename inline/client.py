"""``inline send``: the scanner's side of the connection (the role of gadgetron_ismrmrd_client).

Sends a config (name as CONFIG_FILE, or chain text as CONFIG_TEXT), optional session
parameters (TEXT ``{"parameters": {...}}``), the header, then waveforms and acquisitions in
time-stamp order -- as fast as possible or paced in real time from
``acquisition_time_stamp`` -- and CLOSE, while a second thread receives images and text
until the server's CLOSE.
"""

from __future__ import annotations

import json
import re
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ismrmrd

from inline.mrdfile import RawScan
from inline.protocol import ConfigFile, ConfigText, MessageId, MessageReader, MessageWriter, ProtocolError

log = logging.getLogger(__name__)

#: A QC alert as TEXT: FIRE level prefix, then the alert code in brackets (inline.qc.alert).
QC_ALERT_TEXT = re.compile(r"^(INFO|WARNING|ERROR)\s+\[[a-z_]+\] ")

#: Duration of one ``acquisition_time_stamp`` tick: Siemens scanners count 2.5 ms [s].
DEFAULT_TICK_S = 2.5e-3


@dataclass
class SendResult:
    """What came back from the server.

    Attributes:
        images: returned images, in arrival order.
        texts: returned TEXT messages.
        closed: the server sent CLOSE.
        receive_times_s: arrival time of each image since the first acquisition was sent [s].
        send_duration_s: time spent sending the scan [s].
    """

    images: list[ismrmrd.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    closed: bool = False
    receive_times_s: list[float] = field(default_factory=list)
    send_duration_s: float = 0.0
    send_error: str | None = None

    @property
    def errors(self) -> list[str]:
        """ERROR texts about the reconstruction itself (protocol, config, chain failures)."""
        return [t for t in self.texts if t.startswith("ERROR") and not QC_ALERT_TEXT.match(t)]

    @property
    def alerts(self) -> list[str]:
        """QC alert texts (``LEVEL   [code] message action``), critical ones included."""
        return [t for t in self.texts if QC_ALERT_TEXT.match(t)]


def send_scan(
    scan: RawScan,
    host: str = "127.0.0.1",
    port: int = 9002,
    *,
    config_name: str | None = "default",
    config_text: str | None = None,
    parameters: dict[str, Any] | None = None,
    pace: str = "fast",
    tick_s: float = DEFAULT_TICK_S,
    timeout_s: float = 600.0,
    on_image: Callable[[ismrmrd.Image], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> SendResult:
    """Stream ``scan`` to an MRD server and collect what it sends back.

    Args:
        pace: ``"fast"`` (as fast as possible) or ``"realtime"`` (from acquisition time stamps).
        tick_s: duration of one time-stamp tick [s].
        timeout_s: give up waiting for the server's CLOSE after this long [s].

    Raises:
        ValueError: bad ``pace`` or neither config given.
        OSError: cannot connect.
    """
    if pace not in ("fast", "realtime"):
        raise ValueError(f"pace must be 'fast' or 'realtime', got {pace!r}")
    if config_name is None and config_text is None:
        raise ValueError("give a config name or config text")
    result = SendResult()
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer = MessageWriter(sock)
    t_start = time.perf_counter()

    def image_received(image: ismrmrd.Image) -> None:
        result.images.append(image)
        result.receive_times_s.append(time.perf_counter() - t_start)
        if on_image:
            on_image(image)

    def text_received(text: str) -> None:
        result.texts.append(text)
        if on_text:
            on_text(text)

    def closed() -> None:
        result.closed = True

    receiver = start_receiver(
        sock, timeout_s, on_image=image_received, on_text=text_received, on_close=closed,
        on_broken=lambda e: result.texts.append(f"ERROR   connection to the server broke: {e}"),
        name="inline-client-receive",
    )
    try:
        if config_text is not None:
            writer.send(ConfigText(config_text))
        else:
            writer.send(ConfigFile(config_name))
        if parameters:
            writer.send_text(json.dumps({"parameters": parameters}))
        writer.send_header(scan.header_xml)
        _send_items(writer, scan, pace, tick_s, result)
        writer.send_close()
    except OSError as e:  # the server closed on us (it says why in a TEXT we may have got)
        result.send_error = str(e)
        log.warning("sending stopped: %s", e)
    result.send_duration_s = time.perf_counter() - t_start
    receiver.join(timeout_s)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    return result


def start_receiver(
    sock: socket.socket,
    timeout_s: float,
    *,
    on_image: Callable[[ismrmrd.Image], None],
    on_text: Callable[[str], None],
    on_close: Callable[[], None],
    on_broken: Callable[[Exception], None],
    name: str,
) -> threading.Thread:
    """Read the server's replies on a daemon thread until CLOSE (then ``on_close``) or a
    broken connection (``on_broken``); other message ids are logged and ignored."""

    def receive() -> None:
        reader = MessageReader(sock, idle_timeout_s=timeout_s)
        try:
            while (msg := reader.read()) is not None:
                msg_id, obj = msg
                if msg_id == MessageId.IMAGE:
                    on_image(obj)
                elif msg_id == MessageId.TEXT:
                    on_text(str(obj))
                elif msg_id == MessageId.CLOSE:
                    on_close()
                    return
                else:
                    log.warning("ignoring %s message from the server", msg_id.name)
        except (ProtocolError, OSError) as e:
            on_broken(e)

    receiver = threading.Thread(target=receive, name=name, daemon=True)
    receiver.start()
    return receiver


def _stamp(item) -> int:
    return item.acquisition_time_stamp if isinstance(item, ismrmrd.Acquisition) else item.time_stamp


def _send_items(writer: MessageWriter, scan: RawScan, pace: str, tick_s: float, result: SendResult) -> None:
    if not scan.items:
        return
    t0 = time.perf_counter()
    stamp0 = _stamp(scan.items[0])
    for item in scan.items:
        if result.closed:  # the server gave up (error): stop streaming
            break
        if pace == "realtime":
            delay = t0 + (_stamp(item) - stamp0) * tick_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        writer.send(item)
