"""Raw-data journal: every received stream kept on disk as it arrives.

During a scan the journal is a write-ahead log: the messages exactly as received
(CONFIG, HEADER, TEXT parameters, ACQUISITION, WAVEFORM) are appended to
``<dir>/<session>.mrd`` in MRD stream format and flushed to the operating system after
each message, so a crash of the chain, a disconnect or a killed server loses nothing that
arrived. Writing raw messages costs a few microseconds per acquisition on the reader
thread; an HDF5 write costs ~0.4 ms and holds the GIL, so the ISMRMRD .h5 copy
(``<session>.h5``: header, acquisitions, waveforms) is made when the session ends, and
:func:`recover` converts any ``.mrd`` left without an ``.h5`` (after a crash) at server start.
Both replay with ``inline run``.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import h5py

from inline.mrdfile import ScanWriter, read_scan

log = logging.getLogger(__name__)


class Journal:
    """Write-ahead journal of one session.

    Args:
        directory: journal directory (created if missing).
        session_id: file stem; unique per session.
    """

    def __init__(self, directory: str | Path, session_id: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.session_id = session_id
        self.stream_path = self.directory / f"{session_id}.mrd"
        self.h5_path = self.directory / f"{session_id}.h5"
        self._file = None  # opened on the first message: port probes leave no files
        self._writer = None
        self._lock = threading.Lock()
        self.config: dict[str, Any] = {}
        self.count = 0
        self.closed = False

    def record(self, obj: Any) -> None:
        """Append one received message and flush it to the OS."""
        with self._lock:
            if self.closed:
                return
            if self._file is None:
                from inline.protocol import MessageWriter

                self._file = open(self.stream_path, "wb")
                self._writer = MessageWriter(self._file)
            self._writer.send(obj)
            self._file.flush()
            self.count += 1

    def note_config(self, **info: Any) -> None:
        """Remember the config name/text and parameters, stored as attributes of the .h5."""
        self.config.update({k: v for k, v in info.items() if v is not None})

    def close(self, convert: bool = True) -> Path | None:
        """Close the stream file and (by default) write the ISMRMRD .h5 copy; returns its path,
        or None when the stream held no header."""
        with self._lock:
            if self.closed:
                return self.h5_path if self.h5_path.exists() else None
            self.closed = True
            if self._file is None:
                return None
            self._file.close()
        if not convert:
            return None
        return convert_stream(self.stream_path, self.h5_path, self.config)


def convert_stream(stream_path: Path, h5_path: Path, attrs: dict[str, Any] | None = None) -> Path | None:
    """Write the ISMRMRD .h5 copy of an .mrd journal (a truncated tail is dropped with a warning)."""
    from inline.protocol import ProtocolError

    try:
        scan = read_scan(stream_path)
    except ProtocolError as e:
        log.warning("journal %s ends in a broken message (%s); converting what precedes it", stream_path, e)
        scan = _read_prefix(stream_path)
    except ValueError as e:
        log.warning("journal %s has no header, no .h5 written: %s", stream_path, e)
        return None
    if scan is None:
        return None
    tmp = h5_path.with_suffix(".h5.part")
    with ScanWriter(tmp, scan.header_xml) as w:
        w.extend(scan.items)
    with h5py.File(tmp, "a") as f:
        f["dataset"].attrs["inline_journal"] = json.dumps(attrs or {})
    tmp.replace(h5_path)
    log.info("journal %s: %d items", h5_path, len(scan.items))
    return h5_path


def _read_prefix(stream_path: Path):
    from inline.mrdfile import RawScan
    from inline.protocol import MessageId, MessageReader, ProtocolError

    xml, items = None, []
    with open(stream_path, "rb") as fh:
        reader = MessageReader(fh)
        try:
            while (msg := reader.read()) is not None:
                msg_id, obj = msg
                if msg_id == MessageId.HEADER:
                    xml = obj.xml
                elif msg_id in (MessageId.ACQUISITION, MessageId.WAVEFORM):
                    items.append(obj)
                elif msg_id == MessageId.CLOSE:
                    break
        except ProtocolError:
            pass
    return RawScan(xml, items) if xml is not None else None


def journal_info(h5_path: str | Path) -> dict[str, Any]:
    """Config name/text and parameters a journal was recorded with ({} for other files)."""
    with h5py.File(h5_path, "r") as f:
        raw = f["dataset"].attrs.get("inline_journal") if "dataset" in f else None
    return json.loads(raw) if raw else {}


def recover(directory: str | Path) -> list[Path]:
    """Convert every ``.mrd`` journal in ``directory`` that has no ``.h5`` (left by a crash)."""
    done = []
    d = Path(directory)
    if not d.is_dir():
        return done
    for p in sorted(d.glob("*.mrd")):
        h5 = p.with_suffix(".h5")
        if not h5.exists():
            out = convert_stream(p, h5, {"recovered": True})
            if out is not None:
                done.append(out)
    return done
