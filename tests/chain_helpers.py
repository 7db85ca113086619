"""Test helpers: run gadgets sequentially without a server, build headers and acquisitions.

:func:`run_chain` is a single-threaded stand-in for the chain engine: each message goes
through the gadgets in order; a gadget only sees the types in its ``accepts`` and every
other message passes it unchanged; at the end ``close()`` is called on each gadget in
order and what it yields continues down the chain.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# ``tests/gadgets`` (no __init__.py) would otherwise shadow the ``gadgets`` package as a
# namespace package whenever ``tests/`` is on sys.path and the repo root is not.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import ismrmrd
import ismrmrd.xsd
import numpy as np
import yaml

from inline.engine import check_domain
from inline.gadget import Gadget, SessionContext
from inline.registry import lookup
from inline.trace import Trace

DATA_DIR = REPO / ".." / "shared" / "data"
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


def run_chain(gadgets: Sequence[Gadget], messages: Iterable[Any]) -> list[tuple[Any, Trace]]:
    """Push ``messages`` through ``gadgets`` in order, close them, return the ``(payload, trace)`` outputs.

    A message may be a payload (its trace is "arrived now") or a ``(payload, Trace)`` pair.
    """
    out: list[tuple[Any, Trace]] = []

    def push(stage: int, item: Any, trace: Trace) -> None:
        if stage == len(gadgets):
            out.append((item, trace))
            return
        g = gadgets[stage]
        if isinstance(item, g.accepts):
            check_domain(g, item)  # as the engine: no hybrid-space data for a k-space gadget
            for o, t in g.process(item, trace):
                push(stage + 1, o, t)
        else:
            push(stage + 1, item, trace)

    for m in messages:
        if isinstance(m, tuple) and len(m) == 2 and isinstance(m[1], Trace):
            push(0, m[0], m[1])
        else:
            push(0, m, Trace.arrived())
    for i, g in enumerate(gadgets):
        for o, t in g.close():
            push(i + 1, o, t)
    return out


def payloads(outputs: list[tuple[Any, Trace]], kind: type | None = None) -> list[Any]:
    """The payloads of ``run_chain`` outputs, optionally only those of type ``kind``."""
    return [p for p, _ in outputs if kind is None or isinstance(p, kind)]


def context(header: Any) -> SessionContext:
    return SessionContext(header=header, session_id="test")


def build_chain(header: Any, config: Path = DEFAULT_CONFIG, overrides: dict[str, dict] | None = None) -> list[Gadget]:
    """Gadget instances of a chain config; ``overrides`` maps a stage name to parameter updates."""
    spec = yaml.safe_load(config.read_text())
    ctx = context(header)
    chain = []
    for stage in spec["gadgets"]:
        cls = lookup(stage["class"])
        values = dict(stage.get("parameters") or {})
        values.update((overrides or {}).get(stage["name"], {}))
        chain.append(cls(ctx, cls.Params(**values)))
    return chain


#: The stages that turn raw readouts into k-space buffers, by their names in the configs.
TO_BUFFERS = ("noise", "oversampling", "accumulate")


#: ``build_stages`` overrides for k-space buffers (the default chain keeps readouts in hybrid space).
KSPACE_BUFFERS = {"oversampling": {"output_domain": "kspace"}}


def build_stages(
    header: Any, names: Sequence[str] = TO_BUFFERS, config: Path = DEFAULT_CONFIG, overrides: dict[str, dict] | None = None
) -> list[Gadget]:
    """The named stages of a chain config, in chain order; ``overrides`` maps a stage name to
    parameter updates (e.g. :data:`KSPACE_BUFFERS` to feed a gadget that needs k-space)."""
    spec = yaml.safe_load(config.read_text())
    keep = {st["name"] for st in spec["gadgets"] if st["name"] in names}
    missing = set(names) - keep
    if missing:
        raise KeyError(f"{config.name} has no stages {sorted(missing)}")
    ctx = context(header)
    overrides = overrides or {}
    return [
        lookup(st["class"])(ctx, lookup(st["class"]).Params(**{**(st.get("parameters") or {}), **overrides.get(st["name"], {})}))
        for st in spec["gadgets"]
        if st["name"] in keep
    ]


def read_mrd(path: Path) -> tuple[Any, list[ismrmrd.Acquisition]]:
    """Parsed XML header and all acquisitions of an ISMRMRD .h5 file."""
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        header = ismrmrd.xsd.CreateFromDocument(dset.read_xml_header())
        acqs = [dset.read_acquisition(i) for i in range(dset.number_of_acquisitions())]
    finally:
        dset.close()
    return header, acqs


def make_header(
    encoded: tuple[int, int, int] = (128, 64, 1),
    encoded_fov: tuple[float, float, float] = (256.0, 128.0, 5.0),
    recon: tuple[int, int, int] | None = None,
    recon_fov: tuple[float, float, float] | None = None,
    ky: tuple[int, int, int] | None = None,
    kz: tuple[int, int, int] | None = None,
    receiver_channels: int = 4,
    noise_bandwidth: float | None = None,
) -> Any:
    """An ``ismrmrdHeader`` with one Cartesian encoding; ``ky``/``kz`` = (min, max, centre) limits."""
    recon = recon or encoded
    recon_fov = recon_fov or encoded_fov
    ky = ky or (0, encoded[1] - 1, encoded[1] // 2)
    kz = kz or (0, encoded[2] - 1, encoded[2] // 2)
    bw = (
        f"<relativeReceiverNoiseBandwidth>{noise_bandwidth}</relativeReceiverNoiseBandwidth>" if noise_bandwidth else ""
    )

    def xyz(tag: str, v) -> str:
        return f"<{tag}><x>{v[0]}</x><y>{v[1]}</y><z>{v[2]}</z></{tag}>"

    def lim(tag: str, v) -> str:
        return f"<{tag}><minimum>{v[0]}</minimum><maximum>{v[1]}</maximum><center>{v[2]}</center></{tag}>"

    xml = f"""<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
 <acquisitionSystemInformation><receiverChannels>{receiver_channels}</receiverChannels>{bw}</acquisitionSystemInformation>
 <experimentalConditions><H1resonanceFrequency_Hz>123000000</H1resonanceFrequency_Hz></experimentalConditions>
 <encoding>
  <encodedSpace>{xyz("matrixSize", encoded)}{xyz("fieldOfView_mm", encoded_fov)}</encodedSpace>
  <reconSpace>{xyz("matrixSize", recon)}{xyz("fieldOfView_mm", recon_fov)}</reconSpace>
  <encodingLimits>{lim("kspace_encoding_step_1", ky)}{lim("kspace_encoding_step_2", kz)}</encodingLimits>
  <trajectory>cartesian</trajectory>
 </encoding>
</ismrmrdHeader>"""
    return ismrmrd.xsd.CreateFromDocument(xml)


def make_acq(
    data: np.ndarray,
    ky: int = 0,
    kz: int = 0,
    flags: Sequence[int] = (),
    center: int | None = None,
    sample_time_us: float = 5.0,
    scan_counter: int = 0,
    **idx: int,
) -> ismrmrd.Acquisition:
    """An acquisition with ``(coils, samples)`` ``data``; ``idx`` sets other encoding counters."""
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    acq.center_sample = data.shape[1] // 2 if center is None else center
    acq.sample_time_us = sample_time_us
    acq.scan_counter = scan_counter
    acq.idx.kspace_encode_step_1 = ky
    acq.idx.kspace_encode_step_2 = kz
    for name, value in idx.items():
        setattr(acq.idx, name, value)
    for f in flags:
        acq.set_flag(f)
    acq.read_dir = (1.0, 0.0, 0.0)
    acq.phase_dir = (0.0, 1.0, 0.0)
    acq.slice_dir = (0.0, 0.0, 1.0)
    return acq


def kspace_acquisitions(
    kspace: np.ndarray, flags_last: Sequence[int] = (ismrmrd.ACQ_LAST_IN_SLICE,), ky_offset: int = 0, **kw
) -> list[ismrmrd.Acquisition]:
    """One acquisition per (kz, ky) line of ``(coils, kz, ky, kx)`` k-space, last line flagged."""
    _, nz, ny, _ = kspace.shape
    acqs = []
    for z in range(nz):
        for y in range(ny):
            last = z == nz - 1 and y == ny - 1
            acqs.append(
                make_acq(
                    kspace[:, z, y],
                    ky=y + ky_offset,
                    kz=z,
                    flags=flags_last if last else (),
                    scan_counter=len(acqs),
                    **kw,
                )
            )
    return acqs


def centred_fft(img: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Centred orthonormal forward FFT (image -> k-space), numpy reference for tests."""
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(img, axes=axes), axes=axes, norm="ortho"), axes=axes)


def centred_ifft(k: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Centred orthonormal inverse FFT (k-space -> image), numpy reference for tests."""
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)


def recon_buffer(
    k: np.ndarray, header: Any, readout_fov_mm: float | None = None, center: int | None = None, domain: str = "kspace", slice: int = 1
) -> Any:
    """A fully sampled ``ReconBuffer`` of ``k`` ``(coils, kz, ky, kx)`` as the accumulator makes it
    (history ``ACC``); ``domain`` "hybrid" transforms it along x first."""
    from inline.buffers import AcquisitionIndex, EncodingInfo, ReconBuffer

    enc = EncodingInfo.from_header(header)
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples = k.shape[-1]
    head.center_sample = k.shape[-1] // 2 if center is None else center
    if domain == "hybrid":
        k = centred_ifft(k, axes=(-1,))
    return ReconBuffer(
        data=k.astype(np.complex64),
        sampled=np.ones(k.shape[1:3], bool),
        index=AcquisitionIndex(slice=slice),
        encoding=enc,
        header=head,
        readout_fov_mm=enc.encoded_fov_mm[0] if readout_fov_mm is None else readout_fov_mm,
        history=["ACC"],
        domain=domain,
    )
