"""Tests of inline.protocol: round trips, interop with ismrmrd-python, and every bad input."""

from __future__ import annotations

import copy
import io
import pickle
import socket
import struct
import threading
import time

import ismrmrd
import numpy as np
import pytest
from ismrmrd import serialization as mrdser

from inline import __version__
from inline.gadget import Text
from inline.protocol import (
    CLOSE,
    Close,
    ConfigFile,
    ConfigText,
    Header,
    IdleTimeout,
    InvalidHeader,
    MalformedMessage,
    MessageId,
    MessageReader,
    MessageTooLarge,
    MessageWriter,
    ProtocolError,
    Query,
    Response,
    TruncatedMessage,
    UnknownMessageId,
    UnknownQuery,
    answer_query,
    parse_header,
)

HEADER_XML = """<?xml version="1.0" encoding="UTF-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>256</x><y>128</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>600</x><y>300</y><z>6</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>128</x><y>128</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>300</x><y>300</y><z>6</z></fieldOfView_mm></reconSpace>
    <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>127</maximum><center>64</center></kspace_encoding_step_1></encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>"""


# -- helpers ---------------------------------------------------------------------------------


def make_acquisition(rng, channels=4, samples=64, traj_dims=0, scan_counter=0):
    data = (rng.standard_normal((channels, samples)) + 1j * rng.standard_normal((channels, samples))).astype(np.complex64)
    traj = rng.standard_normal((samples, traj_dims)).astype(np.float32) if traj_dims else None
    acq = ismrmrd.Acquisition.from_array(data, traj, scan_counter=scan_counter, center_sample=samples // 2)
    acq.idx.kspace_encode_step_1 = scan_counter % 128
    acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    acq.position[:] = (1.5, -2.0, 3.25)
    return acq


def make_image(rng, dtype=np.complex64, shape=(2, 1, 6, 5), meta=None):
    if np.issubdtype(dtype, np.complexfloating):
        arr = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    else:
        arr = (rng.standard_normal(shape) * 1000).astype(dtype)
    img = ismrmrd.Image.from_array(arr, image_index=3, image_series_index=2, slice=1)
    if meta is not None:
        img.meta = meta
    return img


def make_waveform(rng):
    data = rng.integers(0, 2**32, size=(3, 40), dtype=np.uint32)
    return ismrmrd.Waveform.from_array(data, waveform_id=5, time_stamp=12345)


def write_bytes(objs) -> bytes:
    buf = io.BytesIO()
    w = MessageWriter(buf)
    for o in objs:
        w.send(o)
    return buf.getvalue()


def read_all(data: bytes, **kw):
    return list(MessageReader(io.BytesIO(data), **kw))


def socket_roundtrip(objs, **reader_kw):
    """Send ``objs`` from a thread over a socketpair; read them back until CLOSE or EOF."""
    a, b = socket.socketpair()
    errors = []

    def send():
        try:
            w = MessageWriter(a)
            for o in objs:
                w.send(o)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
        finally:
            a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    try:
        reader = MessageReader(b, **reader_kw)
        out = list(reader)
    finally:
        t.join(5)
        a.close()
        b.close()
    assert not errors, errors
    return out, reader


def assert_same_acquisition(got, want):
    assert isinstance(got, ismrmrd.Acquisition)
    assert got.getHead() == want.getHead()
    assert got.data.dtype == np.complex64 and got.data.shape == want.data.shape
    np.testing.assert_array_equal(got.data, want.data)
    assert got.traj.dtype == np.float32 and got.traj.shape == want.traj.shape
    np.testing.assert_array_equal(got.traj, want.traj)


def assert_same_image(got, want):
    assert isinstance(got, ismrmrd.Image)
    for field in ("version", "data_type", "flags", "channels", "image_index", "image_series_index", "slice"):
        assert getattr(got, field) == getattr(want, field), field
    assert tuple(got.matrix_size) == tuple(want.matrix_size)
    assert got.data.dtype == want.data.dtype and got.data.shape == want.data.shape
    np.testing.assert_array_equal(got.data, want.data)
    assert dict(got.meta) == dict(want.meta)


# -- round trips -----------------------------------------------------------------------------


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def all_message_objects(rng):
    return [
        ConfigFile("default_recon.yaml"),
        ConfigText("name: x\nstages: []\n"),
        Header(HEADER_XML),
        Text("INFO    héllo scanner ✓"),
        Query(correlation_id=42, query="gadgetron::version"),
        Response(correlation_id=42, response="0.1.0"),
        make_acquisition(rng, channels=8, samples=128, traj_dims=0, scan_counter=1),
        make_acquisition(rng, channels=2, samples=32, traj_dims=3, scan_counter=2),
        make_image(rng, np.complex64, meta={"ImageComment": "a_b", "WindowCenter": "12", "List": ["1", "2"]}),
        make_waveform(rng),
        np.arange(24, dtype=np.int16).reshape(2, 3, 4),
        CLOSE,
    ]


def check_all_messages(sent, got):
    assert [m for m, _ in got] == [
        MessageId.CONFIG_FILE,
        MessageId.CONFIG_TEXT,
        MessageId.HEADER,
        MessageId.TEXT,
        MessageId.QUERY,
        MessageId.RESPONSE,
        MessageId.ACQUISITION,
        MessageId.ACQUISITION,
        MessageId.IMAGE,
        MessageId.WAVEFORM,
        MessageId.NDARRAY,
        MessageId.CLOSE,
    ]
    objs = [o for _, o in got]
    assert objs[0] == ConfigFile("default_recon.yaml")
    assert objs[1] == ConfigText("name: x\nstages: []\n")
    assert objs[2] == Header(HEADER_XML)
    assert type(objs[3]) is Text and objs[3] == "INFO    héllo scanner ✓"
    assert objs[4] == Query(42, "gadgetron::version") and objs[4].reserved == 0
    assert objs[5] == Response(42, "0.1.0")
    assert_same_acquisition(objs[6], sent[6])
    assert_same_acquisition(objs[7], sent[7])
    assert objs[7].traj.shape == (32, 3)
    assert_same_image(objs[8], sent[8])
    assert objs[8].meta["List"] == ["1", "2"]
    assert objs[9] == sent[9]
    assert objs[9].waveform_id == 5 and objs[9].data.dtype == np.uint32
    np.testing.assert_array_equal(objs[10], sent[10])
    assert objs[10].dtype == np.int16
    assert objs[11] is CLOSE


def test_roundtrip_every_message_bytesio(rng):
    sent = all_message_objects(rng)
    data = write_bytes(sent)
    reader = MessageReader(io.BytesIO(data))
    got = list(reader)
    check_all_messages(sent, got)
    assert reader.messages_received == len(sent)
    assert reader.bytes_received == len(data)
    assert reader.read() is None  # clean EOF after CLOSE


@pytest.mark.timeout(10)
def test_roundtrip_every_message_socketpair(rng):
    sent = all_message_objects(rng)
    got, reader = socket_roundtrip(sent)
    check_all_messages(sent, got)
    assert reader.bytes_received == len(write_bytes(sent))


@pytest.mark.timeout(10)
def test_large_acquisitions_bigger_than_readahead_over_socket(rng):
    acqs = [make_acquisition(rng, channels=32, samples=512, traj_dims=2, scan_counter=i) for i in range(20)]
    texts = [Text(f"t{i}") for i in range(20)]
    sent = [x for pair in zip(acqs, texts) for x in pair] + [CLOSE]
    got, _ = socket_roundtrip(sent, readahead_bytes=4096)
    assert len(got) == 41
    for i in range(20):
        assert_same_acquisition(got[2 * i][1], acqs[i])
        assert got[2 * i + 1] == (MessageId.TEXT, f"t{i}")
        assert got[2 * i][1].data.flags.c_contiguous and got[2 * i][1].data.flags.writeable


@pytest.mark.timeout(20)
@pytest.mark.parametrize("readahead", [None, 8192, 300_000])
def test_streams_crossing_the_readahead_in_every_way_over_socket(rng, readahead):
    """Scanner-sized readouts (32 x 512, 131 kB) and small ones mixed, with the default 1 MiB
    read-ahead (payloads copied out of it, messages straddling its end) and smaller ones
    (payloads above half of it received directly, with what follows in the same call)."""
    sizes = [(32, 512), (4, 128), (32, 512), (2, 3000), (32, 512), (1, 1)] * 8
    acqs = [make_acquisition(rng, channels=c, samples=n, scan_counter=i) for i, (c, n) in enumerate(sizes)]
    sent = [*acqs, Text("end"), CLOSE]
    kw = {} if readahead is None else {"readahead_bytes": readahead}
    got, reader = socket_roundtrip(sent, **kw)
    assert len(got) == len(sent)
    for g, a in zip(got, acqs):
        assert_same_acquisition(g[1], a)
        assert g[1].data.flags.c_contiguous and g[1].data.flags.writeable and g[1].data.flags.aligned
    assert got[-2] == (MessageId.TEXT, "end") and got[-1][0] is MessageId.CLOSE
    assert reader.bytes_received == len(write_bytes(sent))


def test_received_acquisition_behaves_like_a_constructed_one(rng):
    import inline.protocol as protocol

    sent = [make_acquisition(rng, channels=3, samples=16, scan_counter=4), make_acquisition(rng, channels=3, samples=16)]
    (_, a), (_, b) = read_all(write_bytes(sent))
    assert a.traj.shape == (16, 0) and b.traj.shape == (16, 0)
    assert copy.deepcopy(a) == sent[0] and pickle.loads(pickle.dumps(a)) == sent[0]
    a.data[0, 0] = 7 + 1j  # the arrays are the message's own, writable, not shared
    assert a.data[0, 0] == 7 + 1j and b.data[0, 0] == sent[1].data[0, 0]
    a.resize(number_of_samples=8, active_channels=2)
    assert a.data.shape == (2, 8) and a.number_of_samples == 8 and b.number_of_samples == 16
    head, data, traj = sent[0].getHead(), sent[0].data.copy(), sent[0].traj.copy()
    assert protocol._wrap_acquisition_direct(head, data, traj) == protocol._wrap_acquisition_public(head, data, traj)


@pytest.mark.parametrize(
    "dtype", [np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64, np.complex64, np.complex128]
)
def test_ndarray_roundtrip_dtypes(rng, dtype):
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    (msg_id, got), = read_all(write_bytes([arr]))
    assert msg_id is MessageId.NDARRAY
    assert got.dtype == np.dtype(dtype) and got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, arr)


def test_ndarray_noncontiguous_scalar_and_empty(rng):
    base = rng.standard_normal((4, 6)).astype(np.float32)
    sent = [base.T, np.full((), 2.5), np.zeros((0, 3), np.complex64)]
    got = [o for _, o in read_all(write_bytes(sent))]
    np.testing.assert_array_equal(got[0], base.T)
    assert got[1].shape == () and got[1] == 2.5
    assert got[2].shape == (0, 3) and got[2].dtype == np.complex64


def test_ndarray_unsupported_dtype_is_refused():
    with pytest.raises(TypeError, match="int64 has no MRD data type"):
        MessageWriter(io.BytesIO()).send(np.arange(3, dtype=np.int64))


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint32, np.float32, np.float64, np.complex64, np.complex128])
def test_image_roundtrip_dtypes(rng, dtype):
    img = make_image(rng, dtype, shape=(1, 2, 3, 4), meta={"k": "v"})
    (msg_id, got), = read_all(write_bytes([img]))
    assert msg_id is MessageId.IMAGE
    assert_same_image(got, img)
    assert got.attribute_string == img.attribute_string


def test_image_int_travels_as_int32(rng):
    # ismrmrd-python stores data_type INT (4) as int64; the wire carries int32 (MRD spec).
    img = ismrmrd.Image(head=ismrmrd.ImageHeader(data_type=ismrmrd.DATATYPE_INT, channels=1, matrix_size=(3, 2, 1)))
    img.data[...] = np.arange(6).reshape(1, 1, 2, 3) - 3
    raw = write_bytes([img])
    assert len(raw) == 2 + 198 + 8 + 6 * 4
    (_, got), = read_all(raw)
    np.testing.assert_array_equal(got.data.ravel(), np.arange(6) - 3)


def test_image_without_meta_and_writer_leaves_image_unchanged(rng):
    img = make_image(rng, np.float32)
    before = bytes(img._head)
    (_, got), = read_all(write_bytes([img]))
    assert bytes(img._head) == before
    assert got.attribute_string == "" and dict(got.meta) == {}


def test_header_from_parsed_object_and_str(rng):
    parsed = parse_header(HEADER_XML)
    got = read_all(write_bytes([parsed, Header(HEADER_XML)]))
    assert [m for m, _ in got] == [MessageId.HEADER, MessageId.HEADER]
    again = got[0][1].parse()
    assert again == parsed
    assert again.encoding[0].encodedSpace.matrixSize.x == 256
    assert got[1][1].xml == HEADER_XML

    buf = io.BytesIO()
    MessageWriter(buf).send_header(HEADER_XML)
    assert buf.getvalue() == struct.pack("<HI", 3, len(HEADER_XML.encode())) + HEADER_XML.encode()


@pytest.mark.parametrize("suffix", [b"", b"\x00", b"\x00\x00"])
def test_header_with_and_without_trailing_nul(suffix):
    raw = HEADER_XML.encode() + suffix
    (msg_id, got), = read_all(struct.pack("<HI", 3, len(raw)) + raw)
    assert msg_id is MessageId.HEADER
    assert got.xml == HEADER_XML
    assert got.parse().experimentalConditions.H1resonanceFrequency_Hz == 63500000
    assert parse_header(raw).encoding[0].reconSpace.matrixSize.y == 128


def test_config_file_is_nul_padded_1024_bytes():
    raw = write_bytes([ConfigFile("chain.yaml")])
    assert len(raw) == 2 + 1024
    assert raw[:2] == b"\x01\x00" and raw[2:12] == b"chain.yaml" and set(raw[12:]) == {0}
    with pytest.raises(ValueError, match="at most 1023"):
        MessageWriter(io.BytesIO()).send_config_file("x" * 1024)


def test_query_response_layout_is_gadgetron():
    raw = write_bytes([Query(7, "gadgetron::version"), Response(7, "1.2")])
    q = b"gadgetron::version"
    assert raw == struct.pack("<HQQQ", 6, 0, 7, len(q)) + q + struct.pack("<HQQ", 7, 7, 3) + b"1.2"


def test_close_is_a_singleton_and_alone_on_the_wire():
    assert Close() is CLOSE and repr(CLOSE) == "CLOSE"
    assert pickle.loads(pickle.dumps(CLOSE)) is CLOSE and copy.deepcopy(CLOSE) is CLOSE
    assert write_bytes([CLOSE]) == b"\x04\x00"
    assert read_all(b"\x04\x00") == [(MessageId.CLOSE, CLOSE)]


def test_ismrmrd_config_types_and_plain_str_dispatch():
    raw = write_bytes([mrdser.ConfigFile("a.xml"), mrdser.ConfigText("<c/>"), "plain"])
    got = read_all(raw)
    assert got == [
        (MessageId.CONFIG_FILE, ConfigFile("a.xml")),
        (MessageId.CONFIG_TEXT, ConfigText("<c/>")),
        (MessageId.TEXT, "plain"),
    ]


def test_send_refuses_unknown_types_and_inconsistent_acquisitions(rng):
    w = MessageWriter(io.BytesIO())
    with pytest.raises(TypeError, match="no MRD message for float"):
        w.send(3.5)
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples, head.active_channels = 10, 2
    bad = ismrmrd.Acquisition(head=head, data=np.zeros((2, 5), np.complex64), trajectory=np.zeros((10, 0), np.float32))
    with pytest.raises(ValueError, match="2 channels x 10 samples"):
        w.send(bad)
    assert w.messages_sent == 0 and w.bytes_sent == 0


@pytest.mark.timeout(10)
def test_writer_is_thread_safe(rng):
    n_threads, per_thread = 4, 50
    acqs = {t: [make_acquisition(rng, channels=4, samples=256, scan_counter=t * 1000 + i) for i in range(per_thread)]
            for t in range(n_threads)}
    a, b = socket.socketpair()
    w = MessageWriter(a)
    got = []

    def receive():
        got.extend(MessageReader(b))

    rt = threading.Thread(target=receive)
    rt.start()
    senders = [threading.Thread(target=lambda t=t: [w.send(x) for x in acqs[t]]) for t in range(n_threads)]
    for s in senders:
        s.start()
    for s in senders:
        s.join(5)
    w.send_close()
    rt.join(5)
    a.close()
    b.close()
    assert len(got) == n_threads * per_thread + 1
    by_counter = {o.scan_counter: o for m, o in got if m is MessageId.ACQUISITION}
    for t in range(n_threads):
        for i, want in enumerate(acqs[t]):
            assert_same_acquisition(by_counter[t * 1000 + i], want)
    assert w.messages_sent == n_threads * per_thread + 1


class _FailingSink:
    def __init__(self):
        self.calls = 0

    def write(self, b):
        self.calls += 1
        if self.calls == 2:
            raise BrokenPipeError("peer gone")
        return len(b)


def test_writer_refuses_to_continue_after_a_failed_write(rng):
    sink = _FailingSink()
    w = MessageWriter(sink)
    with pytest.raises(BrokenPipeError):
        w.send(make_acquisition(rng))  # header part written, data part fails
    with pytest.raises(OSError, match="earlier send failed mid-message"):
        w.send_close()
    assert sink.calls == 2 and w.messages_sent == 0


# -- interop with ismrmrd-python -------------------------------------------------------------


def interop_objects(rng):
    return [
        mrdser.ConfigFile("default.xml"),
        mrdser.ConfigText("<config/>"),
        make_acquisition(rng, channels=4, samples=64, traj_dims=2, scan_counter=9),
        make_image(rng, np.float32, meta={"a": "1"}),
        make_waveform(rng),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.ones((2, 2), np.complex64) * (1 + 2j),
        "some text",
    ]


def test_ismrmrd_serializer_bytes_are_read_by_us(rng):
    objs = interop_objects(rng)
    buf = io.BytesIO()
    ser = mrdser.ProtocolSerializer(buf)
    ser.serialize(parse_header(HEADER_XML))
    for o in objs:
        ser.serialize(o)
    ser.close()
    got = read_all(buf.getvalue())
    assert [m for m, _ in got] == [
        MessageId.HEADER, MessageId.CONFIG_FILE, MessageId.CONFIG_TEXT, MessageId.ACQUISITION, MessageId.IMAGE,
        MessageId.WAVEFORM, MessageId.NDARRAY, MessageId.NDARRAY, MessageId.TEXT, MessageId.CLOSE,
    ]
    assert got[0][1].parse() == parse_header(HEADER_XML)
    assert got[1][1] == ConfigFile("default.xml")
    assert got[2][1] == ConfigText("<config/>")
    assert_same_acquisition(got[3][1], objs[2])
    assert_same_image(got[4][1], objs[3])
    assert got[5][1] == objs[4]
    np.testing.assert_array_equal(got[6][1], objs[5])
    np.testing.assert_array_equal(got[7][1], objs[6])
    assert got[8][1] == "some text"


def test_our_bytes_are_read_by_ismrmrd_deserializer(rng):
    objs = interop_objects(rng)
    buf = io.BytesIO()
    w = MessageWriter(buf)
    w.send_header(HEADER_XML)
    for o in objs:
        w.send(o)
    w.send_close()
    buf.seek(0)
    got = list(mrdser.ProtocolDeserializer(buf).deserialize())
    assert got[0] == parse_header(HEADER_XML)
    assert got[1] == "default.xml" and isinstance(got[1], mrdser.ConfigFile)
    assert got[2] == "<config/>" and isinstance(got[2], mrdser.ConfigText)
    assert got[3] == objs[2]
    assert_same_image(got[4], objs[3])  # (our writer leaves the image's attribute_string_len alone)
    assert got[4].attribute_string_len == len(objs[3].attribute_string)
    assert got[5] == objs[4]
    np.testing.assert_array_equal(got[6], objs[5])
    np.testing.assert_array_equal(got[7], objs[6])
    assert got[8] == "some text"
    assert len(got) == 9  # deserialize() returns at CLOSE


def test_our_bytes_match_ismrmrd_serializer_exactly(rng):
    objs = interop_objects(rng)
    theirs = io.BytesIO()
    ser = mrdser.ProtocolSerializer(theirs)
    for o in objs:
        ser.serialize(o)
    ser.close()
    assert write_bytes(objs + [CLOSE]) == theirs.getvalue()


# -- bad input -------------------------------------------------------------------------------


def test_unknown_message_id_names_id_number_and_offset():
    raw = write_bytes([Text("hi")]) + struct.pack("<H", 1337) + b"junk"
    reader = MessageReader(io.BytesIO(raw))
    assert reader.read() == (MessageId.TEXT, "hi")
    with pytest.raises(UnknownMessageId, match=r"unknown message id 1337 .*message #2 at byte offset 8") as exc:
        reader.read()
    assert not exc.value.recoverable
    with pytest.raises(ProtocolError, match="out of sync"):
        reader.read()  # never silently resumes after losing the framing


@pytest.mark.parametrize(
    "cut, what",
    [
        (1, "message id"),
        (2 + 100, "AcquisitionHeader"),
        (2 + 340 + 10, "trajectory"),
        (2 + 340 + 64 * 2 * 4 + 100, "data"),
    ],
)
def test_eof_mid_acquisition_is_truncated(rng, cut, what):
    raw = write_bytes([make_acquisition(rng, channels=4, samples=64, traj_dims=2)])
    with pytest.raises(TruncatedMessage, match=f"peer closed the connection.*while reading {what}: got"):
        read_all(raw[:cut])


def test_eof_mid_header_length_and_mid_text():
    with pytest.raises(TruncatedMessage, match=r"HEADER \(3\) message #1 at byte offset 0 while reading XML length: got 1 of 4"):
        read_all(b"\x03\x00\x10")
    with pytest.raises(TruncatedMessage, match="got 3 of 10 bytes"):
        read_all(struct.pack("<HI", 5, 10) + b"abc")


def test_clean_eof_at_boundary_returns_none(rng):
    reader = MessageReader(io.BytesIO(write_bytes([Text("a"), Text("b")])))
    assert reader.read() == (MessageId.TEXT, "a")
    assert reader.read() == (MessageId.TEXT, "b")
    assert reader.read() is None
    assert reader.read() is None
    assert list(MessageReader(io.BytesIO(b""))) == []


def test_length_fields_beyond_maximum():
    with pytest.raises(MessageTooLarge, match=r"text of 2147483648 bytes in TEXT \(5\) message #1 at byte offset 0 exceeds the maximum of 536870912 bytes"):
        read_all(struct.pack("<HI", 5, 2**31))
    big_xml = struct.pack("<HI", 3, 5000) + b"x" * 5000
    with pytest.raises(MessageTooLarge, match=r"XML of 5000 bytes in HEADER .* exceeds the maximum of 4096 bytes"):
        read_all(big_xml, max_message_bytes=4096)
    assert read_all(big_xml, max_message_bytes=5000)[0][1].xml == "x" * 5000
    with pytest.raises(MessageTooLarge, match="query string of 1099511627776 bytes in QUERY"):
        read_all(struct.pack("<HQQQ", 6, 0, 1, 2**40))


def test_acquisition_size_beyond_maximum():
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples, head.active_channels = 512, 512
    raw = struct.pack("<H", 1008) + bytes(head)  # 2 MiB of data announced, none sent
    with pytest.raises(MessageTooLarge, match=r"payload of 2097152 bytes in ACQUISITION .*number_of_samples=512, active_channels=512.*exceeds the maximum of 1048576"):
        read_all(raw, max_message_bytes=2**20)


def test_ndarray_and_image_sizes_beyond_maximum():
    raw = struct.pack("<HHHHQQ", 1030, 7, 0, 2, 2**20, 2**20)
    with pytest.raises(MessageTooLarge, match="data .* in NDARRAY .* exceeds the maximum"):
        read_all(raw)
    head = ismrmrd.ImageHeader(data_type=ismrmrd.DATATYPE_CXFLOAT, channels=64, matrix_size=(1024, 1024, 64))
    with pytest.raises(MessageTooLarge, match=r"payload \(attribute string \+ data\) of \d+ bytes in IMAGE"):
        read_all(struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", 0))


def test_invalid_header_xml():
    with pytest.raises(InvalidHeader, match="invalid ISMRMRD XML header.*no element found"):
        Header("<ismrmrdHeader>").parse()
    with pytest.raises(InvalidHeader, match="missing 1 required"):
        parse_header(HEADER_XML.replace("<H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz>", ""))
    with pytest.raises(InvalidHeader, match="Unknown property"):
        parse_header(HEADER_XML.replace("<encoding>", "<bogus/><encoding>"))
    bad_enum = HEADER_XML.replace(">cartesian<", ">zigzag<")
    with pytest.raises(InvalidHeader, match="zigzag"):
        parse_header(bad_enum)
    with pytest.warns(Warning, match="zigzag"):
        assert parse_header(bad_enum, strict=False).encoding[0].trajectory == "zigzag"
    with pytest.raises(InvalidHeader, match="empty"):
        parse_header(b"\x00")


def test_non_utf8_header_is_invalid_but_recoverable():
    raw = struct.pack("<HI", 3, 2) + b"\xff\xfe" + write_bytes([CLOSE])
    reader = MessageReader(io.BytesIO(raw))
    with pytest.raises(InvalidHeader, match="not valid UTF-8") as exc:
        reader.read()
    assert exc.value.recoverable
    assert reader.read() == (MessageId.CLOSE, CLOSE)


def test_query_with_reserved_bits_and_bad_image_meta_are_recoverable(rng):
    img = make_image(rng, np.float32)
    head = bytearray(bytes(img._head))
    meta = b"<notMeta/>"
    bad_image = struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", len(meta)) + meta + img.data.tobytes()
    raw = write_bytes([Query(1, "gadgetron::version", reserved=5)]) + bad_image + write_bytes([CLOSE])
    reader = MessageReader(io.BytesIO(raw))
    with pytest.raises(MalformedMessage, match=r"reserved field is 5 in QUERY \(6\) message #1 at byte offset 0, must be 0"):
        reader.read()
    with pytest.raises(MalformedMessage, match=r"attribute string in IMAGE \(1022\) message #2 .* is not ISMRMRD meta XML"):
        reader.read()
    assert reader.read() == (MessageId.CLOSE, CLOSE)
    assert reader.messages_received == 3


def test_unknown_image_data_type():
    head = ismrmrd.ImageHeader(data_type=99, channels=1, matrix_size=(2, 2, 1))
    with pytest.raises(MalformedMessage, match="unknown data_type 99"):
        read_all(struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", 0))


@pytest.mark.timeout(10)
def test_peer_disconnects_mid_message_over_socket(rng):
    raw = write_bytes([Text("first"), make_acquisition(rng, channels=32, samples=512)])
    a, b = socket.socketpair()
    a.sendall(raw[:50_000])
    a.close()
    reader = MessageReader(b)
    assert reader.read() == (MessageId.TEXT, "first")
    t0 = time.monotonic()
    with pytest.raises(TruncatedMessage, match=r"peer closed the connection in ACQUISITION \(1008\) message #2 .*got \d+ of 131072"):
        reader.read()
    assert time.monotonic() - t0 < 2
    b.close()


@pytest.mark.timeout(10)
def test_connection_reset_mid_message_over_tcp(rng):
    raw = write_bytes([make_acquisition(rng, channels=8, samples=256)])
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        client.sendall(raw[:1000])
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        with pytest.raises(TruncatedMessage, match="ACQUISITION"):
            MessageReader(conn, idle_timeout_s=5).read()
        conn.close()


@pytest.mark.timeout(10)
def test_timeout_mid_message_is_truncated_and_idle_at_boundary_is_recoverable(rng):
    a, b = socket.socketpair()
    reader = MessageReader(b, idle_timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(IdleTimeout, match=r"no message within 0.2 s after message #0") as exc:
        reader.read()
    assert exc.value.recoverable and 0.15 < time.monotonic() - t0 < 2
    a.sendall(write_bytes([Text("late")]))
    assert reader.read() == (MessageId.TEXT, "late")  # still in sync after an idle timeout

    a.sendall(struct.pack("<HI", 5, 100) + b"only part")
    with pytest.raises(TruncatedMessage, match=r"timed out in TEXT \(5\) message #2 at byte offset 10 while reading text: got 9 of 100"):
        reader.read()
    a.close()
    b.close()


@pytest.mark.timeout(10)
def test_socket_file_timeout_is_final():
    a, b = socket.socketpair()
    b.settimeout(0.1)
    with b.makefile("rb") as f:
        reader = MessageReader(f)
        with pytest.raises(IdleTimeout, match="before the source timed out") as exc:
            reader.read()
        assert not exc.value.recoverable  # SocketIO refuses every read after a timeout
        with pytest.raises(ProtocolError, match="out of sync"):
            reader.read()
    a.close()
    b.close()


@pytest.mark.timeout(10)
def test_buffered_socket_file_does_not_wait_for_later_messages():
    # A request/response peer: we must return its QUERY without waiting for more bytes.
    a, b = socket.socketpair()
    b.settimeout(5)
    with b.makefile("rb") as f:
        MessageWriter(a).send_query(3, "gadgetron::version")
        reader = MessageReader(f)
        assert reader.read() == (MessageId.QUERY, Query(3, "gadgetron::version"))
    a.close()
    b.close()


# -- queries ---------------------------------------------------------------------------------


def test_answer_query():
    assert answer_query("gadgetron::version") == __version__
    assert answer_query("inline::version") == __version__
    from importlib import metadata

    assert answer_query("ismrmrd::version") == metadata.version("ismrmrd")
    assert answer_query("gadgetron::info::python") == "1"
    assert int(answer_query("gadgetron::info::memory")) > 0
    assert "inline" in answer_query("gadgetron::info")
    with pytest.raises(UnknownQuery, match=r"no answer for QUERY 'gadgetron::nope'; known keys: .*gadgetron::version"):
        answer_query("gadgetron::nope")
