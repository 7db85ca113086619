"""Other reconstructions of the same data, timed per slice (per volume in 3D).

* ``scipy_fft_rss`` (the floor): what a plain script does with a slice's k-space once it is
  complete: ``scipy.fft`` centred inverse FFT of the oversampled k-space, crop the readout
  oversampling, root-sum-of-squares over coils. Zero-filled for undersampled cases.
* ``bart``: BART's command line on the same k-space, per slice, ``.cfl`` I/O and process
  starts included (what a script calling BART pays): ``fft -u -i``, ``resize -c`` (crop),
  ``rss``; or for undersampled cases the readout crop, ``ecalib -m1`` and ``pics`` (l2 or
  l1-wavelet).
* ``gadgetron_python``: the ``gadgetron`` package's example recon as a server, fed by the
  same replay client (:mod:`inline.benchmark.gadgetron_peer`), latency measured as ours.

Each returns a dict with ``latency_ms`` (p50/p95/p99/max over slices x repeats, first
repeat excluded as warm-up for the in-process peers), or ``{"skipped": reason}``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from inline.bart import bart_executable, kspace_to_bart, read_cfl, write_cfl
from inline.benchmark.cases import BenchCase, PreparedScan
from inline.latency import Percentiles

Progress = Callable[[str], None]


def percentiles_ms(values_ms: list[float]) -> dict:
    p = Percentiles.of_ns(np.asarray(values_ms, dtype=np.float64) * 1e6)
    return {"n": p.n, "p50": p.p50_ms, "p95": p.p95_ms, "p99": p.p99_ms, "max": p.max_ms}


def _recon_x(header_xml: str) -> int:
    from inline.protocol import parse_header

    return int(parse_header(header_xml).encoding[0].reconSpace.matrixSize.x)


def fft_rss(kspace: np.ndarray, nx: int) -> np.ndarray:
    """Centred inverse FFT over (kz, ky, kx) of ``(coils, kz, ky, kx)``, readout crop to ``nx``, RSS."""
    import scipy.fft as fft

    axes = (1, 2, 3) if kspace.shape[1] > 1 else (2, 3)
    img = fft.fftshift(fft.ifftn(fft.ifftshift(kspace, axes=axes), axes=axes, norm="ortho"), axes=axes)
    x0 = (img.shape[-1] - nx) // 2
    img = img[..., x0 : x0 + nx]
    return np.sqrt(np.sum(img.real**2 + img.imag**2, axis=0))


def scipy_floor(kspaces: dict[int, np.ndarray], header_xml: str, repeats: int = 3, progress: Progress | None = None) -> dict:
    """The floor: :func:`fft_rss` per slice, ``repeats`` passes, the first excluded."""
    nx = _recon_x(header_xml)
    times: list[float] = []
    for rep in range(repeats):
        for k in kspaces.values():
            t0 = time.perf_counter_ns()
            fft_rss(k, nx)
            if rep:
                times.append((time.perf_counter_ns() - t0) / 1e6)
        if progress:
            progress(f"scipy floor pass {rep + 1}/{repeats}")
    return {"what": "scipy.fft centred ifft + readout crop + RSS per slice (no prewhitening)", "latency_ms": percentiles_ms(times), "times_ms": times}


def bart_peer(case: BenchCase, kspaces: dict[int, np.ndarray], header_xml: str, progress: Progress | None = None) -> dict:
    """BART's CLI per slice (see the module docstring); the first slice twice, once as warm-up."""
    try:
        exe = bart_executable()
    except RuntimeError as e:
        return {"skipped": str(e)}
    nx = _recon_x(header_xml)
    slices = list(kspaces.values())[: case.bart_slices]
    three_d = slices[0].shape[1] > 1
    if case.bart == "fft":
        steps = [["fft", "-u", "-i", "7" if three_d else "3", "ksp", "img"], ["resize", "-c", "0", str(nx), "img", "imgc"], ["rss", "8", "imgc", "out"]]
        what = f"bart fft -u -i; resize -c 0 {nx}; rss 8 (per {'volume' if three_d else 'slice'}, .cfl I/O included)"
    else:
        reg = ["-l1"] if case.bart == "pics-l1" else ["-l2"]
        steps = [
            ["fft", "-u", "-i", "1", "ksp", "x"], ["resize", "-c", "0", str(nx), "x", "xc"], ["fft", "-u", "1", "xc", "kc"],
            ["ecalib", "-m1", "kc", "maps"], ["pics", *reg, "-r", str(case.bart_lambda), "-S", "kc", "maps", "out"],
        ]  # fmt: skip
        what = f"bart readout crop (fft/resize/fft); ecalib -m1; pics {reg[0]} -r {case.bart_lambda} (per slice, .cfl I/O included)"
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="inline-bench-bart-") as d:
        for i, k in enumerate([slices[0], *slices]):
            t0 = time.perf_counter_ns()
            write_cfl(Path(d) / "ksp", kspace_to_bart(k))
            for step in steps:
                subprocess.run([exe, *step], cwd=d, check=True, capture_output=True, timeout=600)
            read_cfl(Path(d) / "out")
            if i:
                times.append((time.perf_counter_ns() - t0) / 1e6)
            if progress:
                progress(f"bart {'warm-up' if i == 0 else f'slice {i}/{len(slices)}'}")
    version = subprocess.run([exe, "version"], capture_output=True, text=True).stdout.strip()
    return {"what": what, "version": version, "latency_ms": percentiles_ms(times), "times_ms": times}


def gadgetron_peer(
    case: BenchCase, scan: PreparedScan, pace: str, tick_s: float, repeats: int, progress: Progress | None = None
) -> dict:
    """The gadgetron package's example recon in a child process, one session per round."""
    from inline.benchmark import gadgetron_peer as gp
    from inline.benchmark.replay import free_port, replay, wait_for_port

    reason = gp.unavailable()
    if reason is not None:
        return {"skipped": reason}
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "inline.benchmark.gadgetron_peer", "--port", str(port)], stdout=log, stderr=log)
    try:
        wait_for_port(port, proc)
        latencies: list[float] = []
        completion: list[float] = []
        images = 0
        for r in range(1 + repeats):
            res = replay(scan, "127.0.0.1", port, config_text="<gadgetronStreamConfiguration/>", pace=pace, tick_s=tick_s)
            if res.errors or not res.closed:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                return {"skipped": f"the example recon failed: {res.errors or 'no CLOSE'}; its log: {tail}"}
            if r:
                latencies += res.latencies_ms
                images += res.images
                completion += [res.completion_ms] if res.completion_ms is not None else []
            if progress:
                progress(f"gadgetron {'warm-up' if r == 0 else f'round {r}/{repeats}'}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    return {
        "what": "gadgetron.examples.recon_acquisitions over gadgetron.external.Connection (zero-filled FFT + RSS), separate process",
        "version": gp.version(),
        "images": images,
        "latency_ms": percentiles_ms(latencies),
        "completion_ms": float(np.median(completion)) if completion else None,
        "times_ms": latencies,
    }


def bart_available() -> bool:
    return shutil.which("bart") is not None
