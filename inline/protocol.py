"""The MRD v1 streaming protocol: message framing, a fast reader and a thread-safe writer.

This is the wire protocol Gadgetron and python-ismrmrd-server speak with the scanner
(``ismrmrd/doc/mrd_messages.md``; Gadgetron ``core/readers``/``writers`` and
``Handlers.cpp``; python-ismrmrd-server ``connection.py``). The payload types are the
``ismrmrd`` package's own (:class:`ismrmrd.Acquisition`, :class:`ismrmrd.Image`,
:class:`ismrmrd.Waveform`, :class:`ismrmrd.xsd.ismrmrdHeader`); the framing and the read
loop are ours, because ``ismrmrd.serialization.ProtocolDeserializer`` copies every payload
a second time and turns a closed peer into a bare ``EOFError``.

Byte layout
-----------
Everything is little-endian. Every message is a ``uint16`` message id followed by its
payload::

    id    name          payload
    ----  ------------  ---------------------------------------------------------------
    1     CONFIG_FILE   char[1024]  config name, UTF-8, NUL-padded (C string)
    2     CONFIG_TEXT   uint32 n, char[n]  config text (UTF-8; trailing NULs ignored)
    3     HEADER        uint32 n, char[n]  ISMRMRD XML header (a trailing NUL is accepted)
    4     CLOSE         (nothing)
    5     TEXT          uint32 n, char[n]  UTF-8 text (undecodable bytes replaced)
    6     QUERY         uint64 reserved (must be 0), uint64 correlation_id,
                        uint64 n, char[n]  query key, e.g. "gadgetron::version"
    7     RESPONSE      uint64 correlation_id, uint64 n, char[n]  answer
    1008  ACQUISITION   AcquisitionHeader (340 bytes, ``ismrmrd.AcquisitionHeader``),
                        float32 trajectory[number_of_samples][trajectory_dimensions],
                        complex64 data[active_channels][number_of_samples]
    1022  IMAGE         ImageHeader (198 bytes, ``ismrmrd.ImageHeader``),
                        uint64 m, char[m]  attribute string (ISMRMRD meta XML, may be empty),
                        data[channels][matrix_size[2]][matrix_size[1]][matrix_size[0]]
                        in the header's ``data_type`` (see below)
    1026  WAVEFORM      WaveformHeader (40 bytes, ``ismrmrd.WaveformHeader``),
                        uint32 data[channels][number_of_samples]
    1030  NDARRAY       uint16 data_type, uint16 version, uint16 ndim, uint64 dims[ndim],
                        data in ``data_type``; dims in NumPy (C, slowest-first) order as
                        ismrmrd-python writes them -- ISMRMRD C++ lists them fastest-first,
                        so a C++ peer's array arrives with its axes reversed

MRD data types (IMAGE and NDARRAY): 1 uint16, 2 int16, 3 uint32, 4 int32, 5 float32,
6 float64, 7 complex64, 8 complex128. (ismrmrd-python maps 4 to int64; we keep int32 on
the wire, as the C++ library does, and convert at the boundary, see :func:`mrd_dtype`.)

QUERY and RESPONSE follow Gadgetron (``QueryHandler::handle``, ``ResponseWriter``): the
server answers a QUERY with a RESPONSE carrying the same correlation id; an unknown key is
an error (Gadgetron throws; :func:`answer_query` raises :class:`UnknownQuery`).

Reading
-------
:class:`MessageReader` reads straight from a socket (``recv_into``) or a binary file
(``readinto``) through a 1 MiB read-ahead buffer, so one system call brings whatever the peer
has sent, usually several messages; each payload is copied from there into a freshly
allocated NumPy array that becomes the message's array. Payloads larger than half the
read-ahead are received directly into their arrays, together with what follows them
(``recvmsg_into`` into the array and the read-ahead). Why copy: on loopback most of a
receiver's CPU is kernel TCP work per call (acknowledgements that run the sender's side),
which fewer, larger reads save. Measured on this 2-core VM (receiver CPU per message, median of
3-4 interleaved runs): 32 coils x 512 samples, machine busy with other work: 25 us through the
read-ahead against 47 us receiving each payload directly after a 16 KiB read-ahead (bare
``recv_into`` loop into 1 MiB: 22 us); quiet machine: 19-23 us against 19-20 us (bare loop
16-17 us, ``ismrmrd``'s ProtocolDeserializer 25-26 us). 8 x 512: 5.7 us against 8.7 us
(bare loop 3.3 us); 4 x 128: 3.0 us against 4.4 us (bare loop 0.9 us, ismrmrd 10 us). Every
length field is checked against ``max_message_bytes`` before anything is allocated. A peer that
goes away mid-message or stalls past ``idle_timeout_s`` raises :class:`TruncatedMessage`; the
reader never spins.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import socket
import struct
import threading
from dataclasses import dataclass
from enum import IntEnum
from importlib import metadata
from importlib.util import find_spec
from typing import Any, Callable, Iterator

import ismrmrd
import numpy as np
from ismrmrd.xsd import ismrmrdHeader

from inline import __version__
from inline.gadget import Text

log = logging.getLogger(__name__)

__all__ = [
    "CLOSE",
    "Close",
    "ConfigFile",
    "ConfigText",
    "Header",
    "IdleTimeout",
    "InvalidHeader",
    "MalformedMessage",
    "MessageId",
    "MessageReader",
    "MessageTooLarge",
    "MessageWriter",
    "ProtocolError",
    "Query",
    "Response",
    "TruncatedMessage",
    "UnknownMessageId",
    "UnknownQuery",
    "answer_query",
    "mrd_dtype",
    "mrd_data_type",
    "parse_header",
]


class MessageId(IntEnum):
    """MRD v1 message ids (the ``uint16`` that starts every message)."""

    CONFIG_FILE = 1
    CONFIG_TEXT = 2
    HEADER = 3
    CLOSE = 4
    TEXT = 5
    QUERY = 6
    RESPONSE = 7
    ACQUISITION = 1008
    IMAGE = 1022
    WAVEFORM = 1026
    NDARRAY = 1030


# -- errors ----------------------------------------------------------------------------------


class ProtocolError(Exception):
    """Bad input on the wire. The message names the message id, its number and byte offset.

    Attributes:
        recoverable: True when the offending message was consumed in full, so the stream is
            still in sync and :meth:`MessageReader.read` may be called again. False (the
            default) when the stream can no longer be followed; the reader then refuses
            further reads.
    """

    recoverable: bool = False


class UnknownMessageId(ProtocolError):
    """A message id that MRD v1 does not define (or one we do not handle)."""


class TruncatedMessage(ProtocolError):
    """The peer closed the connection, reset it or stalled past the idle timeout mid-message."""


class IdleTimeout(ProtocolError):
    """No byte of a new message arrived within ``idle_timeout_s`` (stream still in sync)."""

    recoverable = True


class MessageTooLarge(ProtocolError):
    """A length field, or a payload size computed from a header, exceeds ``max_message_bytes``."""


class MalformedMessage(ProtocolError):
    """A message whose framing is fine but whose content is not (bad UTF-8, unknown data type,
    non-zero reserved field, invalid image meta XML)."""


class InvalidHeader(MalformedMessage):
    """The ISMRMRD XML header is not well-formed XML or violates the ISMRMRD schema."""


class UnknownQuery(ProtocolError):
    """A QUERY key we have no answer for (Gadgetron also fails the connection)."""

    recoverable = True


# -- message payloads ------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigFile:
    """CONFIG_FILE (1): the name of a chain config known to the server (at most 1023 UTF-8 bytes)."""

    name: str


@dataclass(frozen=True)
class ConfigText:
    """CONFIG_TEXT (2): a whole chain config sent inline."""

    text: str


@dataclass(frozen=True)
class Header:
    """HEADER (3): the ISMRMRD XML header as received (trailing NULs stripped)."""

    xml: str

    def parse(self, *, strict: bool = True) -> ismrmrdHeader:
        """Parse :attr:`xml`; see :func:`parse_header`. Raises :class:`InvalidHeader`."""
        return parse_header(self.xml, strict=strict)


@dataclass(frozen=True)
class Query:
    """QUERY (6), Gadgetron layout: ``reserved`` must be 0 on the wire."""

    correlation_id: int
    query: str
    reserved: int = 0


@dataclass(frozen=True)
class Response:
    """RESPONSE (7): the answer to the QUERY with the same ``correlation_id``."""

    correlation_id: int
    response: str


class Close:
    """CLOSE (4): end of stream. Use the module constant :data:`CLOSE`; all instances are it."""

    _instance: "Close | None" = None

    def __new__(cls) -> "Close":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CLOSE"

    def __reduce__(self) -> str:
        return "CLOSE"


#: The CLOSE message value: ``reader.read() == (MessageId.CLOSE, CLOSE)``.
CLOSE = Close()


# -- header XML ------------------------------------------------------------------------------

_xml_context = None


def parse_header(xml: str | bytes, *, strict: bool = True) -> ismrmrdHeader:
    """Parse an ISMRMRD XML header into ``ismrmrd.xsd.ismrmrdHeader``.

    Trailing NULs (C senders) are stripped. With ``strict`` (the default) an element the
    schema does not know, a missing required element or a value of the wrong type (an
    enumeration value that does not exist, text where a number belongs) is an error; with
    ``strict=False`` badly typed values are kept as strings, as ``ismrmrd.xsd.CreateFromDocument``
    does.

    Raises:
        InvalidHeader: not UTF-8, not well-formed XML, or a schema violation; the message
            quotes the parser's complaint.
    """
    global _xml_context
    from xsdata.formats.dataclass.context import XmlContext
    from xsdata.formats.dataclass.parsers import XmlParser
    from xsdata.formats.dataclass.parsers.config import ParserConfig

    if isinstance(xml, (bytes, bytearray, memoryview)):
        try:
            xml = bytes(xml).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidHeader(f"ISMRMRD header is not UTF-8: {e}") from None
    text = xml.rstrip("\x00")
    if not text.strip():
        raise InvalidHeader("ISMRMRD header is empty")
    if _xml_context is None:
        _xml_context = XmlContext()
    parser = XmlParser(
        config=ParserConfig(fail_on_unknown_properties=True, fail_on_converter_warnings=strict),
        context=_xml_context,
    )
    try:
        header = parser.from_string(text, ismrmrdHeader)
    except Exception as e:  # xsdata raises ParserError, ConverterError, TypeError (missing element)
        raise InvalidHeader(f"invalid ISMRMRD XML header ({type(e).__name__}): {e}") from e
    return header


def _header_to_xml(header: Any) -> bytes:
    if isinstance(header, Header):
        return header.xml.encode("utf-8")
    if isinstance(header, ismrmrdHeader):
        return ismrmrd.xsd.ToXML(header, encoding="UTF-8").encode("utf-8")
    if isinstance(header, str):
        return header.encode("utf-8")
    if isinstance(header, (bytes, bytearray, memoryview)):
        return bytes(header)
    raise TypeError(f"cannot send {type(header).__name__} as an ISMRMRD header (need Header, ismrmrdHeader, str or bytes)")


# -- QUERY answers ---------------------------------------------------------------------------


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _ismrmrd_version() -> str:
    try:
        return metadata.version("ismrmrd")
    except metadata.PackageNotFoundError:
        return "unknown"


def _system_info() -> str:
    return "\n".join(
        [
            f"Version: inline {__version__} (Gadgetron-compatible MRD v1 server)",
            f"ISMRMRD: {_ismrmrd_version()}",
            f"Python: {platform.python_version()}",
            f"NumPy: {np.__version__}",
            f"Platform: {platform.platform()}",
            f"CPU cores: {os.cpu_count()}",
            f"Memory: {_total_memory_bytes()} bytes",
        ]
    )


#: Query keys and how to answer them (Gadgetron's ``initialize_with_default_queries``).
_QUERY_ANSWERS: dict[str, Callable[[], str]] = {
    "gadgetron::version": lambda: __version__,
    "inline::version": lambda: __version__,
    "ismrmrd::version": _ismrmrd_version,
    "gadgetron::build": lambda: f"inline {__version__} python {platform.python_version()}",
    "gadgetron::info": _system_info,
    "gadgetron::info::memory": lambda: str(_total_memory_bytes()),
    "gadgetron::info::python": lambda: "1",
    "gadgetron::info::matlab": lambda: "0",
    "gadgetron::info::cuda": lambda: "1" if find_spec("cupy") is not None else "0",
}


def answer_query(query: str) -> str:
    """The answer to a Gadgetron QUERY key.

    Known keys: ``gadgetron::version`` (and ``inline::version``: this package's version),
    ``ismrmrd::version``, ``gadgetron::build``, ``gadgetron::info`` (multi-line system
    summary), ``gadgetron::info::memory`` (bytes of RAM), ``gadgetron::info::python`` ("1"),
    ``gadgetron::info::matlab`` ("0"), ``gadgetron::info::cuda`` ("1" if CuPy is installed).

    Raises:
        UnknownQuery: any other key; the message lists the known ones.
    """
    answer = _QUERY_ANSWERS.get(query.rstrip("\x00"))
    if answer is None:
        raise UnknownQuery(f"no answer for QUERY {query!r}; known keys: {', '.join(sorted(_QUERY_ANSWERS))}")
    return answer()


# -- data types ------------------------------------------------------------------------------

_MRD_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<u2"),
    2: np.dtype("<i2"),
    3: np.dtype("<u4"),
    4: np.dtype("<i4"),
    5: np.dtype("<f4"),
    6: np.dtype("<f8"),
    7: np.dtype("<c8"),
    8: np.dtype("<c16"),
}
_DTYPE_CODES: dict[np.dtype, int] = {dt: code for code, dt in _MRD_DTYPES.items()}


def mrd_dtype(data_type: int) -> np.dtype:
    """NumPy dtype (little-endian) of an MRD ``data_type`` code; raises KeyError if unknown."""
    return _MRD_DTYPES[data_type]


def mrd_data_type(dtype: Any) -> int:
    """MRD ``data_type`` code of a NumPy dtype; raises TypeError for dtypes MRD has no code for."""
    dt = np.dtype(dtype).newbyteorder("<")
    code = _DTYPE_CODES.get(dt)
    if code is None:
        raise TypeError(f"dtype {np.dtype(dtype)} has no MRD data type; supported: {', '.join(str(d) for d in _DTYPE_CODES)}")
    return code


# -- wire constants --------------------------------------------------------------------------

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_QUERY_HEAD = struct.Struct("<QQQ")  # reserved, correlation_id, length
_RESPONSE_HEAD = struct.Struct("<QQ")  # correlation_id, length
_NDARRAY_HEAD = struct.Struct("<HHH")  # data_type, version, ndim

_CONFIG_FILE_BYTES = 1024
_ACQ_HEAD_BYTES = ctypes.sizeof(ismrmrd.AcquisitionHeader)
_IMAGE_HEAD_BYTES = ctypes.sizeof(ismrmrd.ImageHeader)
_WAVEFORM_HEAD_BYTES = ctypes.sizeof(ismrmrd.WaveformHeader)
_IMAGE_ATTR_LEN_OFFSET = ismrmrd.ImageHeader.attribute_string_len.offset
_MAX_NDIM = 64  # NumPy's limit
assert (_ACQ_HEAD_BYTES, _IMAGE_HEAD_BYTES, _WAVEFORM_HEAD_BYTES) == (340, 198, 40), "unexpected ismrmrd header sizes"

_MSG_WAITALL = getattr(socket, "MSG_WAITALL", 0)
# ismrmrd.Image allocates INT (4) images as the platform's C long; the wire carries int32.
_IMAGE_INT = 4


class _Stall(Exception):
    """Internal: a receive returned nothing (EOF), timed out or failed with a connection error."""

    def __init__(self, reason: str, what: str, needed: int, got: int, cause: BaseException | None = None):
        super().__init__(reason)
        self.reason, self.what, self.needed, self.got, self.cause = reason, what, needed, got, cause


# -- reader ----------------------------------------------------------------------------------


class MessageReader:
    """Read MRD v1 messages from a socket or a binary file.

    Args:
        source: a connected ``socket.socket`` (read with ``recv_into``) or a binary
            file-like object with ``readinto`` (``readinto1`` is used when present, so a
            buffered socket file never blocks waiting for bytes of a later message).
        max_message_bytes: limit on every length field and on every payload size computed
            from a header (acquisition trajectory + data, image attributes + data, ...).
        idle_timeout_s: for sockets, the longest wait for the next bytes [s]; sets
            ``source.settimeout`` (which also bounds sends on that socket object). At a
            message boundary it raises :class:`IdleTimeout` (recoverable), mid-message
            :class:`TruncatedMessage`. Ignored for files (a socket file's own timeout is
            reported the same way, but is not recoverable). None waits forever.
        readahead_bytes: size of the read-ahead buffer [bytes] (1 MiB: see the module
            docstring). Payloads larger than half of it are received directly into their arrays.

    One reader per stream, used from one thread.

    Attributes:
        messages_received: messages returned by :meth:`read` so far (CLOSE included).
        bytes_received: bytes of the stream consumed by those messages (read-ahead not
            yet consumed is not counted).
    """

    def __init__(
        self,
        source: Any,
        *,
        max_message_bytes: int = 512 * 2**20,
        idle_timeout_s: float | None = None,
        readahead_bytes: int = 1 << 20,
    ):
        if readahead_bytes < 2 * _CONFIG_FILE_BYTES:
            raise ValueError(f"readahead_bytes must be at least {2 * _CONFIG_FILE_BYTES}")
        self.max_message_bytes = int(max_message_bytes)
        self.idle_timeout_s = idle_timeout_s
        self.messages_received = 0
        self._raw_total = 0  # bytes ever received from the source
        self._cap = int(readahead_bytes)
        self._direct_min = self._cap // 2
        self._buf = bytearray(self._cap)
        self._mv = memoryview(self._buf)
        self._start = 0  # unconsumed read-ahead is _buf[_start:_end]
        self._end = 0
        self._broken: ProtocolError | None = None
        self._msg_offset = 0
        self._msg_id: MessageId | None = None

        self._is_socket = isinstance(source, socket.socket)
        self._scatter: Callable[[list[memoryview]], int] | None = None
        if self._is_socket:
            if idle_timeout_s is not None:
                source.settimeout(idle_timeout_s)
            self._recv_some = source.recv_into
            self._recv_all = self._make_waitall(source)
            if hasattr(source, "recvmsg_into"):
                recvmsg_into = source.recvmsg_into

                def scatter(views: list[memoryview]) -> int:
                    return recvmsg_into(views)[0]

                self._scatter = scatter
        elif hasattr(source, "readinto"):
            self._recv_some = getattr(source, "readinto1", None) or source.readinto
            self._recv_all = source.readinto
        else:
            raise TypeError(f"MessageReader needs a socket or a binary file with readinto(), got {type(source).__name__}")
        self._source = source

        self._handlers: dict[int, tuple[MessageId, Callable[[], Any]]] = {
            MessageId.CONFIG_FILE: (MessageId.CONFIG_FILE, self._read_config_file),
            MessageId.CONFIG_TEXT: (MessageId.CONFIG_TEXT, self._read_config_text),
            MessageId.HEADER: (MessageId.HEADER, self._read_header),
            MessageId.CLOSE: (MessageId.CLOSE, _close_value),
            MessageId.TEXT: (MessageId.TEXT, self._read_text),
            MessageId.QUERY: (MessageId.QUERY, self._read_query),
            MessageId.RESPONSE: (MessageId.RESPONSE, self._read_response),
            MessageId.ACQUISITION: (MessageId.ACQUISITION, self._read_acquisition),
            MessageId.IMAGE: (MessageId.IMAGE, self._read_image),
            MessageId.WAVEFORM: (MessageId.WAVEFORM, self._read_waveform),
            MessageId.NDARRAY: (MessageId.NDARRAY, self._read_ndarray),
        }

    @staticmethod
    def _make_waitall(sock: socket.socket) -> Callable[[memoryview], int]:
        recv_into = sock.recv_into

        def recv_all(mv: memoryview) -> int:
            # MSG_WAITALL: one system call for a whole payload on a blocking socket.
            return recv_into(mv, 0, _MSG_WAITALL)

        return recv_all

    @property
    def bytes_received(self) -> int:
        return self._raw_total - (self._end - self._start)

    # -- public --------------------------------------------------------------------------

    def read(self) -> tuple[MessageId, Any] | None:
        """Read one message.

        Returns:
            ``(MessageId, payload)``; payload types: CONFIG_FILE :class:`ConfigFile`,
            CONFIG_TEXT :class:`ConfigText`, HEADER :class:`Header`, CLOSE :data:`CLOSE`,
            TEXT :class:`inline.gadget.Text`, QUERY :class:`Query`, RESPONSE
            :class:`Response`, ACQUISITION ``ismrmrd.Acquisition`` (data complex64
            ``(channels, samples)``, trajectory float32 ``(samples, dims)``), IMAGE
            ``ismrmrd.Image`` (data ``(channels, z, y, x)``), WAVEFORM ``ismrmrd.Waveform``
            (uint32 ``(channels, samples)``), NDARRAY ``np.ndarray``.
            None on a clean end of stream exactly at a message boundary (or a connection
            reset there): the peer went away without CLOSE.

        Raises:
            UnknownMessageId, TruncatedMessage, MessageTooLarge, MalformedMessage,
            InvalidHeader, IdleTimeout: see the classes. After a non-recoverable error
            every further call raises :class:`ProtocolError`.
        """
        if self._broken is not None:
            raise ProtocolError(f"stream out of sync after an earlier error ({self._broken})") from self._broken
        raw_at_start = self._raw_total
        self._msg_offset = self._raw_total - (self._end - self._start)
        self._msg_id = None
        try:
            if self._end - self._start < 2:
                self._fill(2, "message id")
            code = _U16.unpack_from(self._buf, self._start)[0]
            self._start += 2
            entry = self._handlers.get(code)
            if entry is None:
                raise UnknownMessageId(
                    f"unknown message id {code} (0x{code:04x}) {self._where()}; "
                    f"MRD v1 ids: {', '.join(f'{m.value} {m.name}' for m in MessageId)}"
                )
            self._msg_id, handler = entry
            payload = handler()
        except _Stall as s:
            boundary = self._raw_total == raw_at_start and self._msg_offset == raw_at_start
            if boundary and s.reason != "timed out":
                if s.cause is not None:
                    log.info("connection reset at a message boundary after %d messages: %s", self.messages_received, s.cause)
                return None
            if boundary:
                limit = f"within {self.idle_timeout_s} s" if self.idle_timeout_s is not None else "before the source timed out"
                idle = IdleTimeout(f"no message {limit} after message #{self.messages_received} (byte offset {self._msg_offset})")
                if not self._is_socket:  # a socket file (SocketIO) refuses all reads after a timeout
                    idle.recoverable = False
                    self._broken = idle
                raise idle from None
            err = TruncatedMessage(
                f"{s.reason} {self._where()} while reading {s.what}: got {s.got} of {s.needed} bytes"
            )
            self._broken = err
            raise err from s.cause
        except ProtocolError as e:
            if e.recoverable:
                self.messages_received += 1
            else:
                self._broken = e
            raise
        except Exception as e:  # e.g. MemoryError, an OSError of the source: the framing is lost
            self._broken = ProtocolError(f"{type(e).__name__} {self._where()}: {e}")
            raise
        self.messages_received += 1
        return self._msg_id, payload

    def __iter__(self) -> Iterator[tuple[MessageId, Any]]:
        """Yield messages up to and including CLOSE; stop at a clean end of stream."""
        while (msg := self.read()) is not None:
            yield msg
            if msg[0] is MessageId.CLOSE:
                return

    # -- primitives ----------------------------------------------------------------------

    def _where(self) -> str:
        name = f"{self._msg_id.name} ({self._msg_id.value}) " if self._msg_id is not None else ""
        return f"in {name}message #{self.messages_received + 1} at byte offset {self._msg_offset}"

    def _recv(self, fn: Callable[[Any], int | None], mv: Any, what: str, needed: int, got: int) -> int:
        try:
            n = fn(mv)
        except TimeoutError as e:
            raise _Stall("timed out", what, needed, got, None) from e
        except ConnectionError as e:
            raise _Stall("connection lost", what, needed, got, e) from e
        except OSError as e:
            # a SocketIO file that timed out before refuses further reads
            if "timed out" in str(e):
                raise _Stall("timed out", what, needed, got, None) from e
            raise
        if n is None:  # non-blocking file with nothing to read
            raise _Stall("timed out", what, needed, got, None)
        if n == 0:
            raise _Stall("peer closed the connection", what, needed, got, None)
        self._raw_total += n
        return n

    def _fill(self, n: int, what: str, done: int = 0) -> None:
        """Make at least ``n`` (<= read-ahead size) bytes available at ``_buf[_start:]``.

        ``done``: bytes of ``what`` already consumed (for the error message only).
        """
        avail = self._end - self._start
        if avail >= n:
            return
        if self._start + n > self._cap or avail == 0:
            self._mv[:avail] = self._mv[self._start : self._end]
            self._start, self._end = 0, avail
        while self._end - self._start < n:
            self._end += self._recv(
                self._recv_some, self._mv[self._end : self._cap], what, done + n, done + self._end - self._start
            )

    def _take_bytes(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes as a bytes object."""
        if self._end - self._start >= n:
            out = bytes(self._mv[self._start : self._start + n])
            self._start += n
            return out
        out = bytearray(n)
        self._read_into(memoryview(out), what)
        return bytes(out)

    def _read_into(self, dest: memoryview, what: str) -> None:
        """Fill the byte memoryview ``dest`` from the stream: read-ahead first, then directly."""
        n = len(dest)
        start = self._start
        avail = self._end - start
        if avail >= n:
            dest[:] = self._mv[start : start + n]
            self._start = start + n
            return
        if avail:
            dest[:avail] = self._mv[start : self._end]
        self._start = self._end = 0
        pos = avail
        if n - pos < self._direct_min:  # small rest: one read-ahead call also brings what follows
            self._fill(n - pos, what, pos)
            dest[pos:] = self._mv[: n - pos]
            self._start = n - pos
            return
        if self._scatter is not None:
            # One system call for the rest of the payload and, when the peer is ahead (a
            # streaming scanner), the start of what follows into the empty read-ahead: the next
            # message's id and header cost no call of their own. Without MSG_WAITALL, so it never
            # waits for bytes that may not come; a short read is completed below.
            got = self._recv(self._scatter, [dest[pos:], self._mv], what, n, pos)
            if got > n - pos:
                self._end = got - (n - pos)
                return
            pos += got
        recv_all = self._recv_all
        while pos < n:
            pos += self._recv(recv_all, dest[pos:], what, n, pos)

    def _check_size(self, nbytes: int, what: str) -> None:
        if nbytes > self.max_message_bytes:
            raise MessageTooLarge(
                f"{what} of {nbytes} bytes {self._where()} exceeds the maximum of "
                f"{self.max_message_bytes} bytes (max_message_bytes)"
            )

    def _read_length(self, fmt: struct.Struct, what: str) -> int:
        if self._end - self._start < fmt.size:
            self._fill(fmt.size, f"{what} length")
        (n,) = fmt.unpack_from(self._buf, self._start)
        self._start += fmt.size
        self._check_size(n, what)
        return n

    def _decode(self, raw: bytes, what: str, errors: str = "strict", exc: type[MalformedMessage] = MalformedMessage) -> str:
        try:
            return raw.decode("utf-8", errors).rstrip("\x00")
        except UnicodeDecodeError as e:
            err = exc(f"{what} {self._where()} is not valid UTF-8: {e}")
            err.recoverable = True
            raise err from None

    # -- message bodies ------------------------------------------------------------------

    def _read_config_file(self) -> ConfigFile:
        raw = self._take_bytes(_CONFIG_FILE_BYTES, "config file name")
        return ConfigFile(self._decode(raw.split(b"\x00", 1)[0], "config file name"))

    def _read_config_text(self) -> ConfigText:
        n = self._read_length(_U32, "config text")
        return ConfigText(self._decode(self._take_bytes(n, "config text"), "config text"))

    def _read_header(self) -> Header:
        n = self._read_length(_U32, "XML")
        return Header(self._decode(self._take_bytes(n, "XML"), "XML", exc=InvalidHeader))

    def _read_text(self) -> Text:
        n = self._read_length(_U32, "text")
        return Text(self._decode(self._take_bytes(n, "text"), "text", errors="replace"))

    def _read_query(self) -> Query:
        if self._end - self._start < _QUERY_HEAD.size:
            self._fill(_QUERY_HEAD.size, "query head")
        reserved, corr, n = _QUERY_HEAD.unpack_from(self._buf, self._start)
        self._start += _QUERY_HEAD.size
        self._check_size(n, "query string")
        query = self._decode(self._take_bytes(n, "query string"), "query string")
        if reserved:
            err = MalformedMessage(f"reserved field is {reserved} {self._where()}, must be 0 (query {query!r})")
            err.recoverable = True
            raise err
        return Query(corr, query)

    def _read_response(self) -> Response:
        if self._end - self._start < _RESPONSE_HEAD.size:
            self._fill(_RESPONSE_HEAD.size, "response head")
        corr, n = _RESPONSE_HEAD.unpack_from(self._buf, self._start)
        self._start += _RESPONSE_HEAD.size
        self._check_size(n, "response string")
        return Response(corr, self._decode(self._take_bytes(n, "response string"), "response string"))

    def _read_acquisition(self) -> ismrmrd.Acquisition:
        if self._end - self._start < _ACQ_HEAD_BYTES:
            self._fill(_ACQ_HEAD_BYTES, "AcquisitionHeader")
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(self._buf, self._start)
        self._start += _ACQ_HEAD_BYTES
        ns = head.number_of_samples
        nc = head.active_channels
        nt = head.trajectory_dimensions
        nbytes = ns * (nt * 4 + nc * 8)
        if nbytes > self.max_message_bytes:
            raise MessageTooLarge(
                f"payload of {nbytes} bytes {self._where()} (number_of_samples={ns}, active_channels={nc}, "
                f"trajectory_dimensions={nt}) exceeds the maximum of {self.max_message_bytes} bytes (max_message_bytes)"
            )
        if nt:
            traj = np.empty((ns, nt), np.float32)
            if ns:
                self._read_into(memoryview(traj).cast("B"), "trajectory")
        else:
            traj = _no_trajectory(ns)
        data = np.empty((nc, ns), np.complex64)
        if nc and ns:
            self._read_into(memoryview(data).cast("B"), "data")
        return _wrap_acquisition(head, data, traj)

    def _read_image(self) -> ismrmrd.Image:
        need = _IMAGE_HEAD_BYTES + 8
        if self._end - self._start < need:
            self._fill(need, "ImageHeader")
        head = ismrmrd.ImageHeader.from_buffer_copy(self._buf, self._start)
        (attr_len,) = _U64.unpack_from(self._buf, self._start + _IMAGE_HEAD_BYTES)
        self._start += need
        wire_dtype = _MRD_DTYPES.get(head.data_type)
        if wire_dtype is None:
            raise MalformedMessage(f"unknown data_type {head.data_type} {self._where()}; MRD data types are 1..8")
        nx, ny, nz = head.matrix_size
        nc = head.channels
        nbytes = nc * nx * ny * nz * wire_dtype.itemsize
        self._check_size(attr_len + nbytes, "payload (attribute string + data)")
        attr = self._decode(self._take_bytes(attr_len, "attribute string"), "attribute string")
        image = ismrmrd.Image(head=head)  # allocates data (channels, z, y, x) in the header's dtype
        if nbytes:
            data = image.data
            if head.data_type == _IMAGE_INT and data.dtype != wire_dtype:
                wire = np.empty(data.shape, wire_dtype)
                self._read_into(memoryview(wire).cast("B"), "data")
                data[...] = wire
            else:
                self._read_into(memoryview(data).cast("B"), "data")
        if attr:
            try:
                image.attribute_string = attr
            except Exception as e:  # ElementTree.ParseError, or an assert on the root tag
                err = MalformedMessage(f"attribute string {self._where()} is not ISMRMRD meta XML ({type(e).__name__}: {e})")
                err.recoverable = True
                raise err from e
        return image

    def _read_waveform(self) -> ismrmrd.Waveform:
        if self._end - self._start < _WAVEFORM_HEAD_BYTES:
            self._fill(_WAVEFORM_HEAD_BYTES, "WaveformHeader")
        head = ismrmrd.WaveformHeader.from_buffer_copy(self._buf, self._start)
        self._start += _WAVEFORM_HEAD_BYTES
        nbytes = head.channels * head.number_of_samples * 4
        self._check_size(nbytes, f"data ({head.channels} channels x {head.number_of_samples} samples)")
        waveform = ismrmrd.Waveform(head)  # allocates uint32 (channels, samples)
        if nbytes:
            self._read_into(memoryview(waveform.data).cast("B"), "data")
        return waveform

    def _read_ndarray(self) -> np.ndarray:
        if self._end - self._start < _NDARRAY_HEAD.size:
            self._fill(_NDARRAY_HEAD.size, "array head")
        data_type, _version, ndim = _NDARRAY_HEAD.unpack_from(self._buf, self._start)
        self._start += _NDARRAY_HEAD.size
        dtype = _MRD_DTYPES.get(data_type)
        if dtype is None:
            raise MalformedMessage(f"unknown data_type {data_type} {self._where()}; MRD data types are 1..8")
        if ndim > _MAX_NDIM:
            raise MalformedMessage(f"{ndim} dimensions {self._where()}; at most {_MAX_NDIM} are supported")
        dims_fmt = struct.Struct(f"<{ndim}Q")
        if self._end - self._start < dims_fmt.size:
            self._fill(dims_fmt.size, "dims")
        dims = dims_fmt.unpack_from(self._buf, self._start)
        self._start += dims_fmt.size
        count = 1
        for d in dims:
            count *= d
        self._check_size(count * dtype.itemsize, f"data (shape {dims}, {dtype})")
        arr = np.empty(dims, dtype)
        if arr.nbytes:
            self._read_into(memoryview(arr.reshape(-1)).cast("B"), "data")
        return arr


def _close_value() -> Close:
    return CLOSE


_EMPTY_TRAJECTORIES: dict[int, np.ndarray] = {}


def _no_trajectory(samples: int) -> np.ndarray:
    """A shared float32 ``(samples, 0)`` array: it holds no elements, so sharing it is safe."""
    traj = _EMPTY_TRAJECTORIES.get(samples)
    if traj is None:
        traj = _EMPTY_TRAJECTORIES[samples] = np.empty((samples, 0), np.float32)
    return traj


def _wrap_acquisition_public(head: Any, data: np.ndarray, traj: np.ndarray) -> ismrmrd.Acquisition:
    return ismrmrd.Acquisition(head=head, data=data, trajectory=traj)


def _wrap_acquisition_direct(head: Any, data: np.ndarray, traj: np.ndarray) -> ismrmrd.Acquisition:
    # Acquisition.__init__ builds three closures per call (~0.4 us, a quarter of our
    # per-message cost for small readouts); set the attributes it would set instead.
    acq = _Acquisition.__new__(_Acquisition)
    acq._head = head
    acq._Acquisition__data = data
    acq._Acquisition__traj = traj
    return acq


def _pick_acquisition_wrapper() -> Callable[[Any, np.ndarray, np.ndarray], ismrmrd.Acquisition]:
    """The direct wrapper if it still matches this ismrmrd version's constructor, else the public one."""
    head = ismrmrd.AcquisitionHeader(number_of_samples=3, active_channels=2, trajectory_dimensions=1, scan_counter=5)
    data = np.arange(6, dtype=np.complex64).reshape(2, 3)
    traj = np.arange(3, dtype=np.float32).reshape(3, 1)
    try:
        fast = _wrap_acquisition_direct(head, data, traj)
        ok = (
            fast == _wrap_acquisition_public(head, data, traj)
            and np.shares_memory(fast.data, data)
            and np.shares_memory(fast.traj, traj)
            and fast.scan_counter == 5
            and fast.getHead() == head
        )
    except Exception:
        ok = False
    if not ok:
        log.debug("ismrmrd.Acquisition internals changed; using its public constructor")
    return _wrap_acquisition_direct if ok else _wrap_acquisition_public


_Acquisition = ismrmrd.Acquisition
_wrap_acquisition = _pick_acquisition_wrapper()


# -- writer ----------------------------------------------------------------------------------


class MessageWriter:
    """Write MRD v1 messages to a socket (``sendmsg``/``sendall``) or a binary file (``write``).

    Thread-safe: one lock serialises whole messages, so several threads may send on one
    connection. A file sink is flushed after every message unless ``flush=False`` (a reply
    must not sit in a socket file's buffer; a journal on disk may skip the flushes).
    After a failed write (part of a message may be out) every further send raises
    ``OSError`` rather than corrupt the stream.

    Attributes:
        bytes_sent: bytes written so far.
        messages_sent: messages written so far.

    Sending raises ``OSError`` (peer gone, send timeout) as the socket does, ``TypeError``
    for objects that have no MRD message and ``ValueError`` for inconsistent ones (an
    acquisition whose arrays do not match its header, a config name too long).
    """

    def __init__(self, sink: Any, *, flush: bool = True):
        self._sink = sink
        self._lock = threading.Lock()
        self._failed: BaseException | None = None
        self.bytes_sent = 0
        self.messages_sent = 0
        if isinstance(sink, socket.socket):
            self._write_parts = self._sendmsg if hasattr(sink, "sendmsg") else self._sendall_parts
            self._flush = None
        elif hasattr(sink, "write"):
            self._write_parts = self._write_file
            self._flush = getattr(sink, "flush", None) if flush else None
        else:
            raise TypeError(f"MessageWriter needs a socket or a binary file with write(), got {type(sink).__name__}")

    # -- transport -----------------------------------------------------------------------

    def _emit(self, *parts: Any) -> None:
        views = []
        total = 0
        for p in parts:
            mv = memoryview(p)
            if mv.nbytes:
                views.append(mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B"))
                total += mv.nbytes
        with self._lock:
            if self._failed is not None:
                raise OSError(f"cannot send: an earlier send failed mid-message ({self._failed})")
            try:
                self._write_parts(views)
                if self._flush is not None:
                    self._flush()
            except BaseException as e:
                self._failed = e
                raise
            self.bytes_sent += total
            self.messages_sent += 1

    def _sendmsg(self, views: list[memoryview]) -> None:
        sock = self._sink
        if len(views) == 1:
            sock.sendall(views[0])
            return
        while views:
            sent = sock.sendmsg(views)  # scatter-gather: no joining of header and data
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _sendall_parts(self, views: list[memoryview]) -> None:
        for v in views:
            self._sink.sendall(v)

    def _write_file(self, views: list[memoryview]) -> None:
        write = self._sink.write
        for v in views:
            while len(v):
                n = write(v)
                if n is None:
                    raise BlockingIOError(f"sink {self._sink!r} would block; MessageWriter needs a blocking sink")
                v = v[n:]

    # -- dispatch ------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        """Send one message chosen by the type of ``obj``.

        ``ismrmrd.Acquisition`` -> ACQUISITION, ``ismrmrd.Image`` -> IMAGE,
        ``ismrmrd.Waveform`` -> WAVEFORM, ``np.ndarray`` -> NDARRAY, :class:`Header` or
        ``ismrmrdHeader`` -> HEADER, :class:`ConfigFile` / :class:`ConfigText` (or
        ismrmrd-python's) -> CONFIG_FILE / CONFIG_TEXT, :class:`Query`, :class:`Response`,
        :data:`CLOSE`, any other ``str`` (:class:`~inline.gadget.Text`) -> TEXT.

        Raises:
            TypeError: no MRD message for this type.
        """
        method = _SEND_BY_TYPE.get(type(obj))
        if method is None:
            for cls, m in _SEND_BY_ISINSTANCE:
                if isinstance(obj, cls):
                    method = m
                    break
            else:
                raise TypeError(f"no MRD message for {type(obj).__name__}")
        method(self, obj)

    def send_config_file(self, name: str | ConfigFile) -> None:
        """CONFIG_FILE: ``name`` NUL-padded to 1024 bytes; ValueError if 1024 UTF-8 bytes or more."""
        raw = (name.name if isinstance(name, ConfigFile) else str(name)).encode("utf-8")
        if len(raw) >= _CONFIG_FILE_BYTES:
            raise ValueError(f"config file name is {len(raw)} bytes; CONFIG_FILE holds at most {_CONFIG_FILE_BYTES - 1}")
        self._emit(_U16.pack(MessageId.CONFIG_FILE) + raw.ljust(_CONFIG_FILE_BYTES, b"\x00"))

    def send_config_text(self, text: str | ConfigText) -> None:
        """CONFIG_TEXT: uint32 length + UTF-8 text."""
        self._send_string(MessageId.CONFIG_TEXT, text.text if isinstance(text, ConfigText) else str(text))

    def send_header(self, header: Header | ismrmrdHeader | str | bytes) -> None:
        """HEADER: uint32 length + XML (no trailing NUL). Accepts :class:`Header`, a parsed
        ``ismrmrdHeader`` (serialised with ``ismrmrd.xsd.ToXML``), XML text or bytes."""
        raw = _header_to_xml(header)
        self._emit(_U16.pack(MessageId.HEADER) + _U32.pack(len(raw)), raw)

    def send_text(self, text: str) -> None:
        """TEXT: uint32 length + UTF-8 text."""
        self._send_string(MessageId.TEXT, str(text))

    def send_close(self) -> None:
        """CLOSE: the id alone."""
        self._emit(_U16.pack(MessageId.CLOSE))

    def send_query(self, correlation_id: int | Query, query: str | None = None, *, reserved: int = 0) -> None:
        """QUERY: ``send_query(Query(...))`` or ``send_query(correlation_id, "gadgetron::version")``."""
        if isinstance(correlation_id, Query):
            q = correlation_id
        elif query is None:
            raise TypeError("send_query needs a Query or (correlation_id, query)")
        else:
            q = Query(int(correlation_id), query, reserved)
        raw = q.query.encode("utf-8")
        self._emit(_U16.pack(MessageId.QUERY) + _QUERY_HEAD.pack(q.reserved, q.correlation_id, len(raw)), raw)

    def send_response(self, correlation_id: int | Response, response: str | None = None) -> None:
        """RESPONSE: ``send_response(Response(...))`` or ``send_response(correlation_id, text)``."""
        if isinstance(correlation_id, Response):
            r = correlation_id
        elif response is None:
            raise TypeError("send_response needs a Response or (correlation_id, response)")
        else:
            r = Response(int(correlation_id), response)
        raw = r.response.encode("utf-8")
        self._emit(_U16.pack(MessageId.RESPONSE) + _RESPONSE_HEAD.pack(r.correlation_id, len(raw)), raw)

    def send_acquisition(self, acq: ismrmrd.Acquisition) -> None:
        """ACQUISITION: header, trajectory float32 ``(samples, dims)``, data complex64 ``(channels, samples)``.

        Raises:
            ValueError: the arrays' shapes disagree with the header's counts.
        """
        head = acq._head  # the ctypes struct itself; getHead() would deep-copy it
        ns, nc, nt = head.number_of_samples, head.active_channels, head.trajectory_dimensions
        data = acq.data
        traj = acq.traj
        if data.shape != (nc, ns) or traj.shape != (ns, nt):
            raise ValueError(
                f"acquisition header says {nc} channels x {ns} samples, {nt} trajectory dims, "
                f"but data has shape {data.shape} and trajectory {traj.shape}"
            )
        if data.dtype != np.complex64 or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data, np.complex64)
        if traj.dtype != np.float32 or not traj.flags.c_contiguous:
            traj = np.ascontiguousarray(traj, np.float32)
        self._emit(_U16.pack(MessageId.ACQUISITION) + bytes(head), traj, data)

    def send_image(self, image: ismrmrd.Image) -> None:
        """IMAGE: header (attribute_string_len set), uint64 length + meta XML, data ``(channels, z, y, x)``.

        The image is not modified. Raises ValueError when the data's shape disagrees with the
        header's channels/matrix_size, TypeError for a dtype MRD has no code for.
        """
        head = bytearray(bytes(image._head))
        attr = image.attribute_string.encode("utf-8")
        struct.pack_into("<I", head, _IMAGE_ATTR_LEN_OFFSET, len(attr))
        data = image.data
        h = image._head
        nx, ny, nz = h.matrix_size
        if data.size != h.channels * nx * ny * nz:
            raise ValueError(f"image header says {h.channels} channels x {nz} x {ny} x {nx}, but data has shape {data.shape}")
        wire_dtype = _MRD_DTYPES.get(h.data_type)
        if wire_dtype is None:
            raise TypeError(f"image header has unknown data_type {h.data_type}")
        if data.dtype != wire_dtype or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data, wire_dtype)
        self._emit(_U16.pack(MessageId.IMAGE) + bytes(head) + _U64.pack(len(attr)), attr, data)

    def send_waveform(self, waveform: ismrmrd.Waveform) -> None:
        """WAVEFORM: header, uint32 data ``(channels, samples)``."""
        head = waveform._head
        data = waveform.data
        if data.shape != (head.channels, head.number_of_samples):
            raise ValueError(f"waveform header says {head.channels} x {head.number_of_samples}, but data has shape {data.shape}")
        if data.dtype != np.uint32 or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data, np.uint32)
        self._emit(_U16.pack(MessageId.WAVEFORM) + bytes(head), data)

    def send_ndarray(self, arr: np.ndarray) -> None:
        """NDARRAY: data_type, version 0, ndim, dims (NumPy order), data (C order, little-endian).

        Raises TypeError for dtypes MRD has no code for (bool, int8, int64, ...).
        """
        arr = np.asarray(arr)
        code = mrd_data_type(arr.dtype)
        if arr.ndim > _MAX_NDIM:
            raise ValueError(f"array has {arr.ndim} dimensions, at most {_MAX_NDIM}")
        wire = np.ascontiguousarray(arr, _MRD_DTYPES[code])
        head = _U16.pack(MessageId.NDARRAY) + _NDARRAY_HEAD.pack(code, 0, arr.ndim) + struct.pack(f"<{arr.ndim}Q", *arr.shape)
        self._emit(head, wire.reshape(-1))

    def _send_string(self, msg_id: MessageId, text: str) -> None:
        raw = text.encode("utf-8")
        self._emit(_U16.pack(msg_id) + _U32.pack(len(raw)), raw)


def _send_header_obj(w: MessageWriter, obj: Any) -> None:
    w.send_header(obj)


def _send_close_obj(w: MessageWriter, obj: Any) -> None:
    w.send_close()


_SEND_BY_TYPE: dict[type, Callable[[MessageWriter, Any], None]] = {
    ismrmrd.Acquisition: MessageWriter.send_acquisition,
    ismrmrd.Image: MessageWriter.send_image,
    ismrmrd.Waveform: MessageWriter.send_waveform,
    np.ndarray: MessageWriter.send_ndarray,
    Header: _send_header_obj,
    ismrmrdHeader: _send_header_obj,
    ConfigFile: MessageWriter.send_config_file,
    ConfigText: MessageWriter.send_config_text,
    Query: MessageWriter.send_query,
    Response: MessageWriter.send_response,
    Close: _send_close_obj,
    Text: MessageWriter.send_text,
    str: MessageWriter.send_text,
}


def _isinstance_dispatch() -> list[tuple[type, Callable[[MessageWriter, Any], None]]]:
    from ismrmrd import serialization

    # ismrmrd-python's ConfigFile/ConfigText are str subclasses: check them before str.
    return [
        (serialization.ConfigFile, MessageWriter.send_config_file),
        (serialization.ConfigText, MessageWriter.send_config_text),
        (ismrmrd.Acquisition, MessageWriter.send_acquisition),
        (ismrmrd.Image, MessageWriter.send_image),
        (ismrmrd.Waveform, MessageWriter.send_waveform),
        (np.ndarray, MessageWriter.send_ndarray),
        (Header, _send_header_obj),
        (ismrmrdHeader, _send_header_obj),
        (Query, MessageWriter.send_query),
        (Response, MessageWriter.send_response),
        (Close, _send_close_obj),
        (str, MessageWriter.send_text),
    ]


_SEND_BY_ISINSTANCE = _isinstance_dispatch()
