"""Per-slice latency of SENSE (R=4, 2D, 32 coils, 256 x 256) against BART ecalib + pics, at equal NRMSE.

Data: ``simulate_scan(matrix=256, coils=32, slices=2, acceleration=4, acs_lines=24)`` through
NoiseAdjust -> RemoveReadoutOversampling -> AcquisitionAccumulateTrigger; the fully sampled
reference is the RSS of the same simulation at R=1 (same seed: same object, maps, noise model).

Timed (warm, median of ``--repeats``):
* ours, steady state: the SENSE gadget with its coil maps cached for the slice (what every
  repetition after the first costs);
* ours, with maps: the same plus ESPIRiT on the buffer's ACS (the first buffer of a slice);
* sigpy EspiritCalib on the same calibration (once; the library option we did not take);
* BART: ``bart ecalib -m1`` + ``bart pics -l2 -r LAMBDA`` wall time (processes, file I/O
  included, as a reconstruction server would run them).
NRMSE: magnitude after a least-squares scale fit, in the brain mask, against the R=1 RSS.

    .venv/bin/python bench/accel_sense.py [--repeats 5] [--out bench/results/accel_sense_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from chain_helpers import payloads, run_chain  # noqa: E402

from gadgets.accumulate import AcquisitionAccumulateTrigger  # noqa: E402
from gadgets.espirit import calibration_region  # noqa: E402
from gadgets.noise import NoiseAdjust  # noqa: E402
from gadgets.oversampling import RemoveReadoutOversampling  # noqa: E402
from gadgets.sense import SENSE  # noqa: E402
from inline.bart import bart, image_from_bart, kspace_to_bart, read_cfl, write_cfl  # noqa: E402
from inline.buffers import ReconBuffer  # noqa: E402
from inline.gadget import SessionContext  # noqa: E402
from inline.simulate import simulate_scan  # noqa: E402

from common import fitted_nrmse, median_time  # noqa: E402

LAMBDA = 0.001


def buffers(r: int):
    scan = simulate_scan(matrix=256, coils=32, slices=2, acceleration=r, acs_lines=24)
    ctx = SessionContext(header=scan.header, session_id="bench")
    stages = [NoiseAdjust(ctx), RemoveReadoutOversampling(ctx), AcquisitionAccumulateTrigger(ctx)]
    return scan, ctx, payloads(run_chain(stages, scan.acquisitions), ReconBuffer)


def ifft2c(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accel_sense_cpu.json")
    ap.add_argument("--skip-sigpy", action="store_true")
    args = ap.parse_args()

    scan, ctx, bufs = buffers(4)
    _, _, full = buffers(1)
    buf = bufs[0]
    ref = np.sqrt(np.sum(np.abs(ifft2c(full[0].data[:, 0])) ** 2, axis=0))
    mask = scan.brain_mask[0]
    result: dict = {
        "case": "simulate_scan(matrix=256, coils=32, slices=2, acceleration=4, acs_lines=24), slice 0",
        "device": "CPU",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "lambda_l2": LAMBDA,
        "repeats": args.repeats,
    }

    gadget = SENSE(ctx, SENSE.Params(lambda_l2=LAMBDA))
    gadget.apply(buf)
    t_cached, out = median_time(lambda: gadget.apply(buf), args.repeats, warm=True)
    ours = ifft2c(out.data[0, 0])

    def with_maps():
        g = SENSE(ctx, SENSE.Params(lambda_l2=LAMBDA))
        return g.apply(buf)

    t_maps, _ = median_time(with_maps, args.repeats, warm=True)
    result["ours"] = {
        "steady_state_s": t_cached,
        "with_maps_s": t_maps,
        "cg_iterations": gadget.last_result.iterations,
        "nrmse": fitted_nrmse(ours, ref, mask),
    }

    if not args.skip_sigpy:
        import sigpy.mri.app as app

        calib = calibration_region(buf.reference, buf.reference_sampled, 24)
        ksp = np.zeros((32, 256, 256), np.complex64)
        ksp[:, 116:140, 116:140] = calib[:, 0]
        t = time.perf_counter()
        app.EspiritCalib(ksp, calib_width=24, thresh=0.02, kernel_width=6, crop=0.8, show_pbar=False).run()
        result["sigpy_espiritcalib_s"] = time.perf_counter() - t

    if shutil.which("bart"):
        k = buf.data.copy()
        extra = buf.reference_sampled & ~buf.sampled  # embedded ACS: same k-space as ours
        k[:, extra] = buf.reference[:, extra]
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            write_cfl(tmp / "ksp", kspace_to_bart(k))

            def run_bart():
                bart(tmp, "ecalib", "-m1", "ksp", "sens")
                bart(tmp, "pics", "-l2", "-r", str(LAMBDA), "ksp", "sens", "img")

            t_bart, _ = median_time(run_bart, args.repeats, warm=True)
            theirs = image_from_bart(read_cfl(tmp / "img"))[0]
            t = time.perf_counter()
            bart(tmp, "ecalib", "-m1", "ksp", "sens")
            t_ecalib = time.perf_counter() - t
            version = subprocess.run(["bart", "version"], capture_output=True, text=True).stdout.strip()
        result["bart"] = {
            "version": version,
            "ecalib_plus_pics_s": t_bart,
            "ecalib_s": t_ecalib,
            "pics_s": t_bart - t_ecalib,
            "nrmse": fitted_nrmse(theirs, ref, mask),
        }
        result["ratio_steady_state_vs_bart"] = t_cached / t_bart
        result["ratio_with_maps_vs_bart"] = t_maps / t_bart
        result["ratio_steady_vs_bart_pics_only"] = t_cached / max(t_bart - t_ecalib, 1e-9)
    import scipy
    import sigpy

    result["versions"] = {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                          "sigpy": sigpy.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
