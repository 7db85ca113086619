"""The server over real sockets: handshake, parameters, queries, bad input, gadget failures,
concurrent sessions; the server keeps serving after every error."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from conftest import wait_for_files
from inline.client import send_scan
from inline.mrdfile import read_scan
from inline.protocol import MessageId, MessageReader, MessageWriter, Query

pytestmark = pytest.mark.timeout(120)

TOY_CHAIN = """
name: toy
gadgets:
  - name: fail
    class: toy_gadgets:FailOnLine
"""


def exchange(port: int, payload: bytes, half_close: bool = True, timeout: float = 10.0) -> list[tuple]:
    """Send raw bytes, then read replies until CLOSE or EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        reader = MessageReader(s, idle_timeout_s=timeout)
        replies = []
        while (msg := reader.read()) is not None:
            replies.append(msg)
            if msg[0] == MessageId.CLOSE:
                break
        return replies


def config_file(name: str) -> bytes:
    return struct.pack("<H", 1) + name.encode().ljust(1024, b"\0")


def header_msg(xml: str) -> bytes:
    b = xml.encode()
    return struct.pack("<HI", 3, len(b)) + b


def texts(replies) -> list[str]:
    return [str(o) for i, o in replies if i == MessageId.TEXT]


def assert_error_then_close(replies, *fragments: str) -> None:
    ts = texts(replies)
    assert ts and ts[0].startswith("ERROR   "), replies
    for f in fragments:
        assert f in ts[0], ts[0]
    assert replies[-1][0] == MessageId.CLOSE


def assert_server_alive(server, small_scan) -> None:
    res = send_scan(read_scan(small_scan), "127.0.0.1", server.port, config_name="default")
    assert res.closed and not res.errors and len(res.images) == 2


def test_unknown_message_id(server, small_scan):
    replies = exchange(server.port, struct.pack("<H", 999))
    assert_error_then_close(replies, "999")
    assert_server_alive(server, small_scan)


def test_truncated_acquisition_and_disconnect_mid_message(server, small_scan):
    scan = read_scan(small_scan)
    acq = scan.acquisitions[3].to_bytes()
    payload = config_file("default") + header_msg(scan.header_xml) + struct.pack("<H", 1008) + acq[: len(acq) // 2]
    replies = exchange(server.port, payload)  # half-close: EOF arrives mid-acquisition
    assert_error_then_close(replies, "ACQUISITION")
    # a peer that vanishes entirely mid-message must not hang or kill the server
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(payload)
    assert_server_alive(server, small_scan)


def test_length_beyond_maximum(server, small_scan):
    replies = exchange(server.port, struct.pack("<HI", 5, 2**31))
    assert_error_then_close(replies)
    assert "ERROR" in texts(replies)[0] and "exceeds" in texts(replies)[0].lower() or "maximum" in texts(replies)[0].lower()
    assert_server_alive(server, small_scan)


def test_invalid_header_xml(server, small_scan):
    replies = exchange(server.port, config_file("default") + header_msg("<ismrmrdHeader><oops"))
    assert_error_then_close(replies, "header")
    assert_server_alive(server, small_scan)


def test_unknown_config_name_is_reported(server, small_scan):
    res = send_scan(read_scan(small_scan), "127.0.0.1", server.port, config_name="no_such_chain")
    assert res.errors and "unknown config 'no_such_chain'" in res.errors[0]
    assert res.closed and not res.images
    assert_server_alive(server, small_scan)


def test_data_before_header(server):
    scan_acq = ismrmrd.Acquisition.from_array(np.zeros((2, 16), np.complex64))
    replies = exchange(server.port, config_file("default") + struct.pack("<H", 1008) + scan_acq.to_bytes())
    assert_error_then_close(replies, "HEADER")


def test_gadget_failure_ends_session_but_raw_data_is_journaled(server, small_scan):
    scan = read_scan(small_scan)
    res = send_scan(scan, "127.0.0.1", server.port, config_name=None, config_text=TOY_CHAIN)
    assert res.closed
    assert res.errors and "'fail' (FailOnLine) failed: ValueError: cannot handle line 10" in res.errors[0]
    # the journal holds every acquisition the client managed to send, not only those before the failure
    journals = wait_for_files(server.settings.journal_dir, "*.h5")
    assert len(journals) == 1
    kept = read_scan(journals[0]).acquisitions
    assert len(kept) > 11
    assert_server_alive(server, small_scan)


def test_query_gets_response(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        w = MessageWriter(s)
        w.send(Query(correlation_id=42, query="gadgetron::version"))
        w.send_close()
        reader = MessageReader(s, idle_timeout_s=10)
        msg_id, resp = reader.read()
        assert msg_id == MessageId.RESPONSE and resp.correlation_id == 42 and resp.response
        assert reader.read()[0] == MessageId.CLOSE


def test_json_parameters_override_gadget_parameters(server, small_scan):
    res = send_scan(read_scan(small_scan), "127.0.0.1", server.port, config_name="default", parameters={"image_series_index": 7, "ui_colour": "blue"})
    assert not res.errors and len(res.images) == 2
    assert {im.image_series_index for im in res.images} == {7}


def test_ill_typed_json_parameter_is_an_error(server, small_scan):
    res = send_scan(read_scan(small_scan), "127.0.0.1", server.port, config_name="default", parameters={"image_series_index": "seven"})
    assert res.errors and "image_series_index" in res.errors[0]


def test_config_text_and_concurrent_sessions(server, small_scan):
    scan = read_scan(small_scan)
    chain = (Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text()
    results = [None] * 4

    def one(i):
        kw = {"config_name": None, "config_text": chain} if i % 2 else {"config_name": "default.xml"}
        results[i] = send_scan(scan, "127.0.0.1", server.port, **kw)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in results:
        assert r.closed and not r.errors and len(r.images) == 2
        # the latency summary arrives as the last TEXT before CLOSE
        assert any(t.startswith("INFO") and "latency after last readout" in t for t in r.texts)
    ref = np.asarray(results[0].images[0].data)
    for r in results[1:]:
        np.testing.assert_array_equal(np.asarray(r.images[0].data), ref)


def test_only_image_text_close_are_sent(server, small_scan):
    scan = read_scan(small_scan)
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        w = MessageWriter(s)
        w.send_config_file("default")
        w.send_header(scan.header_xml)
        for a in scan.items:
            w.send(a)
        w.send_close()
        ids = [m[0] for m in MessageReader(s, idle_timeout_s=20)]
    assert set(ids) <= {MessageId.IMAGE, MessageId.TEXT, MessageId.CLOSE}
    assert ids.count(MessageId.IMAGE) == 2 and ids[-1] == MessageId.CLOSE


def test_after_a_config_error_the_stream_is_still_journaled(server, small_scan):
    scan = read_scan(small_scan)
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        w = MessageWriter(s)
        w.send_config_file("no_such_chain")
        w.send_header(scan.header_xml)
        for a in scan.items:
            w.send(a)
        w.send_close()
        replies = list(MessageReader(s, idle_timeout_s=20))
    assert_error_then_close(replies, "unknown config 'no_such_chain'")
    journals = wait_for_files(server.settings.journal_dir, "*.h5")
    assert len(read_scan(journals[0]).items) == len(scan.items)
