"""The benchmark cases, and each case's scan prepared as an MRD stream file with an index.

A case names a chain config, how to simulate its scan (:func:`inline.simulate.simulate_scan`
keyword arguments), how to replay it and which reconstruction the peers run on the same
data. A case whose config does not validate, or whose required files are missing, is
listed as skipped with the reason (the suite picks it up once it lands).

A prepared scan is the byte stream the scanner sends after its config message: the HEADER,
then every acquisition and waveform in time-stamp order (no CLOSE), written once with
:class:`inline.protocol.MessageWriter` to ``<cache>/<case>-<key>.mrd``, with the start of each
message and its time stamp in a ``.npz`` beside it. Replays send byte slices of a memory
map of it, so the sender costs almost nothing (it shares the machine with the server).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import ismrmrd
import numpy as np

from inline.protocol import MessageId, MessageReader, MessageWriter

REPO = Path(__file__).resolve().parents[2]
#: Bump when the prepared file layout changes (invalidates caches).
_FORMAT = 1

BartMethod = Literal["fft", "pics-l2", "pics-l1"]


@dataclass(frozen=True)
class BenchCase:
    """One benchmark case.

    Attributes:
        name: file stem of the results (``DIR/NAME.json``).
        description: one line for the report.
        config: chain config name.
        scan: :func:`inline.simulate.simulate_scan` keyword arguments.
        pace: default replay pace, ``"realtime"`` (time stamps) or ``"fast"``.
        sessions: concurrent session counts swept (latency vs concurrency).
        repeats: measured rounds per session count.
        warmup: rounds of one session run first and excluded.
        bart: what the BART peer runs: ``fft`` (fft + rss) or ``pics-l2`` / ``pics-l1``
            (ecalib + pics with l2 / l1-wavelet regularisation).
        bart_lambda: pics regularisation weight.
        bart_slices: slices (volumes in 3D) the BART peer reconstructs (ecalib + pics take seconds).
        requires: files (relative to the repository) the case needs, e.g. model weights.
    """

    name: str
    description: str
    config: str
    scan: dict[str, Any]
    pace: str = "realtime"
    sessions: tuple[int, ...] = (1, 2, 4)
    repeats: int = 2
    warmup: int = 1
    bart: BartMethod = "fft"
    bart_lambda: float = 0.005
    bart_slices: int = 10
    requires: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        """Why this case cannot run here, or None when it can."""
        from inline.config import ConfigError, load_chain, validate_chain

        for rel in self.requires:
            if not (REPO / rel).exists():
                return f"{rel} not found"
        try:
            validate_chain(load_chain(self.config))
        except ConfigError as e:
            return f"config {self.config!r} does not validate: {e}"
        except ImportError as e:  # a gadget module whose dependency is missing
            return f"config {self.config!r} needs {e.name or e}"
        return None

    def cache_key(self) -> str:
        doc = json.dumps({"format": _FORMAT, "scan": self.scan}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:12]


# 2D: a multi-slice spoiled gradient echo at the demo's TR of 100 ms (interleaved slices, so all
# slices complete within the last TR: the slices queue behind each other as on a scanner).
_2D = dict(matrix=256, slices=10, coils=32, tr_ms=100.0, flip_angle_deg=25.0, seed=0)

CASES: dict[str, BenchCase] = {
    c.name: c
    for c in (
        BenchCase(
            "tiny_2d_8ch_64",
            "smoke case: 2D, 2 slices, 8 coils, 64x64 (128 readout samples), TR 10 ms",
            "default",
            dict(matrix=64, slices=2, coils=8, tr_ms=10.0, flip_angle_deg=15.0, noise_samples=256, seed=0),
            pace="fast",
            sessions=(1, 2),
            repeats=1,
        ),
        BenchCase(
            "2d_32ch_256",
            "2D multi-slice Cartesian, 10 slices, 32 coils, 256x256 (512 readout samples, 2x oversampled), TR 100 ms",
            "default",
            _2D,
        ),
        BenchCase(
            "3d_8ch_256x256x128",
            "3D Cartesian slab, 8 coils, 256x256x128 (512 readout samples), streamed as fast as possible",
            "default",
            dict(matrix=256, slices=1, kz=128, coils=8, seed=0),
            pace="fast",
            sessions=(1,),
            repeats=2,
            bart_slices=1,
        ),
        BenchCase(
            "grappa_r4_2d_32ch_256",
            "GRAPPA R=4 (24 ACS lines), 2D, 10 slices, 32 coils, 256x256, TR 100 ms",
            "grappa",
            {**_2D, "acceleration": 4, "acs_lines": 24},
            bart="pics-l2",
            bart_lambda=0.001,
            bart_slices=2,
        ),
        BenchCase(
            "cs_r4_2d_32ch_256",
            "compressed sensing R=4 (24 ACS lines), 2D, 10 slices, 32 coils, 256x256, TR 100 ms",
            "cs",
            {**_2D, "acceleration": 4, "acs_lines": 24},
            sessions=(1, 2),
            repeats=1,
            bart="pics-l1",
            bart_slices=2,
        ),
        BenchCase(
            "dl_r8_2d_32ch_256",
            "deep-learning recon (E2E-VarNet, 8 virtual coils) R=8 (24 ACS lines), 2D, 10 slices, 32 coils, 256x256, TR 100 ms",
            "dl_recon",
            {**_2D, "acceleration": 8, "acs_lines": 24},
            sessions=(1, 2),
            repeats=1,
            bart="pics-l1",
            bart_slices=2,
            requires=("gadgets/dl_recon.py", "configs/dl_recon.yaml", "models/weights/varnet_mni152.pt", "models/varnet_mni152.json"),
        ),
    )
}

#: The cases ``--case all`` runs (the smoke case is for tests).
STANDARD = ("2d_32ch_256", "3d_8ch_256x256x128", "grappa_r4_2d_32ch_256", "cs_r4_2d_32ch_256", "dl_r8_2d_32ch_256")


def cache_dir() -> Path:
    """``$INLINE_BENCH_CACHE``, else ``$XDG_CACHE_HOME/inline/bench`` (``~/.cache/inline/bench``)."""
    env = os.environ.get("INLINE_BENCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inline" / "bench"


@dataclass
class PreparedScan:
    """A case's stream on disk, memory-mapped.

    Attributes:
        path: the ``.mrd`` stream (HEADER, then items; no config, no CLOSE).
        offsets: ``(messages + 1,)`` int64 byte offset of each message and the end.
        stamps: ``(messages,)`` int64 time stamp of each message [ticks]; the HEADER gets the first item's.
        header_xml: the XML header.
        acquisitions: ACQUISITION messages in the stream.
    """

    path: Path
    offsets: np.ndarray
    stamps: np.ndarray
    header_xml: str
    acquisitions: int
    _map: mmap.mmap | None = field(default=None, repr=False)

    @property
    def messages(self) -> int:
        return len(self.stamps)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def view(self) -> memoryview:
        """The whole stream, zero-copy."""
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._map)

    def items(self) -> Iterator[tuple[MessageId, Any]]:
        """The stream's messages parsed (HEADER first)."""
        with open(self.path, "rb") as f:
            yield from MessageReader(f)

    def kspace(self) -> dict[int, np.ndarray]:
        """Imaging k-space per slice, ``(coils, kz, ky, kx)`` complex64 with the readout
        oversampling kept, unsampled lines zero (noise readouts skipped)."""
        from inline.protocol import parse_header

        enc = parse_header(self.header_xml).encoding[0].encodedSpace.matrixSize
        out: dict[int, np.ndarray] = {}
        for msg_id, acq in self.items():
            if msg_id != MessageId.ACQUISITION or acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                continue
            s = int(acq.idx.slice)
            k = out.get(s)
            if k is None:
                k = out[s] = np.zeros((acq.active_channels, max(1, enc.z), enc.y, acq.number_of_samples), np.complex64)
            k[:, acq.idx.kspace_encode_step_2, acq.idx.kspace_encode_step_1, :] = acq.data
        return dict(sorted(out.items()))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _stamp(item: Any) -> int:
    return int(item.acquisition_time_stamp if isinstance(item, ismrmrd.Acquisition) else item.time_stamp)


def prepare(case: BenchCase, directory: Path | None = None) -> PreparedScan:
    """Simulate ``case``'s scan and write its stream, or reuse the cached one."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / f"{case.name}-{case.cache_key()}"
    mrd, index = base.with_suffix(".mrd"), base.with_suffix(".npz")
    if not (mrd.exists() and index.exists()):
        _write(case, mrd, index)
    z = np.load(index)
    return PreparedScan(mrd, z["offsets"], z["stamps"], str(z["header_xml"]), int(z["acquisitions"]))


def _write(case: BenchCase, mrd: Path, index: Path) -> None:
    from inline.simulate import simulate_scan

    sim = simulate_scan(**case.scan)
    items = sorted(sim.acquisitions, key=_stamp)  # stable: the scanner's order within a tick
    offsets = [0]
    tmp = mrd.with_name(mrd.name + ".tmp")
    with open(tmp, "wb") as f:
        w = MessageWriter(f, flush=False)
        w.send_header(sim.header_xml)
        offsets.append(w.bytes_sent)
        for item in items:
            w.send(item)
            offsets.append(w.bytes_sent)
    stamps = [_stamp(items[0]) if items else 0] + [_stamp(i) for i in items]
    n_acq = sum(isinstance(i, ismrmrd.Acquisition) for i in items)
    tmp_index = index.with_name(index.stem + ".tmp.npz")
    np.savez(tmp_index, offsets=np.asarray(offsets, np.int64), stamps=np.asarray(stamps, np.int64), header_xml=np.asarray(sim.header_xml), acquisitions=n_acq)
    os.replace(tmp, mrd)
    os.replace(tmp_index, index)
