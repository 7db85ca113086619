"""Per-slice latency of compressed sensing (R = 4, 2D, 32 coils, 256 x 256): ours vs BART.

Data: ``simulate_scan(matrix=256, coils=32, slices=1, acceleration=1)`` through
RemoveReadoutOversampling + AcquisitionAccumulateTrigger, then retrospectively undersampled
(every 4th ky line + 24 ACS lines), so the fully sampled k-space of the same noise is the
reference: NRMSE = || s |x| - rss_full || / || rss_full || over the object (s fitted, one real
scale per method).

Timed (warm, median of ``--repeats``):

* ours, steady state: :class:`~gadgets.cs.CompressedSensing` with the slice's ESPIRiT maps
  cached (what every slice after the first of a series costs);
* ours, with maps: the same plus sigpy ``EspiritCalib`` on the ACS;
* BART: ``bart ecalib -m1`` + ``bart pics -l1 -r LAMBDA`` wall time (processes, .cfl I/O
  included, as a scanner-side BART call would pay), and ``pics`` alone;
* sigpy.mri.app.L1WaveletRecon (once, for the solver choice in ``gadgets/cs.py``).

Writes ``bench/results/accel_cs_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from chain_helpers import context, payloads, run_chain  # noqa: E402

import gadgets  # noqa: E402,F401
from gadgets.cs import CompressedSensing  # noqa: E402
from gadgets.fft_recon import centred_ifft  # noqa: E402
from inline.bart import kspace_to_bart, read_cfl, write_cfl  # noqa: E402
from inline.buffers import ReconBuffer  # noqa: E402
from inline.registry import lookup  # noqa: E402
from inline.simulate import simulate_scan  # noqa: E402

from common import fitted_nrmse, median_time  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--coils", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lam", type=float, default=0.005)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accel_cs_cpu.json")
    ap.add_argument("--skip-sigpy", action="store_true")
    args = ap.parse_args()
    n, acs = args.matrix, 24

    scan = simulate_scan(matrix=n, coils=args.coils, slices=1, acceleration=1, snr=40, seed=0, noise_samples=0)
    ctx = context(scan.header)
    chain = [lookup(g)(ctx) for g in ("RemoveReadoutOversampling", "AcquisitionAccumulateTrigger")]
    (full,) = payloads(run_chain(chain, scan.acquisitions), ReconBuffer)
    ky = np.arange(n)
    acs_mask = (abs(ky - n // 2 + 0.5) < acs / 2)[None]
    sampled = ((ky - n // 2) % 4 == 0)[None] | acs_mask
    kspace = (full.data * sampled[None, :, :, None]).astype(np.complex64)
    buf = ReconBuffer(**{**full.__dict__, "data": kspace, "sampled": sampled,
                         "reference": full.data * acs_mask[None, :, :, None], "reference_sampled": acs_mask})
    ref = np.sqrt(np.sum(np.abs(centred_ifft(full.data, (2, 3))) ** 2, axis=0))[0]
    support = ref > 0.05 * ref.max()

    results: dict = {}
    params = CompressedSensing.Params(**{"lambda": args.lam})
    g = CompressedSensing(ctx, params)
    g.apply(buf)  # warm: maps cached, FFT plans
    t_cached, out = median_time(lambda: g.apply(buf), args.repeats)
    ours_img = centred_ifft(out.data, (2, 3))[0, 0]

    def with_maps():
        g2 = CompressedSensing(ctx, params)
        return g2.apply(buf)

    t_maps, _ = median_time(with_maps, args.repeats)
    results["ours_cached_maps_s"] = t_cached
    results["ours_with_maps_s"] = t_maps
    results["ours_nrmse"] = fitted_nrmse(ours_img, ref, support)

    with tempfile.TemporaryDirectory() as d:
        write_cfl(Path(d) / "ksp", kspace_to_bart(kspace))

        def bart(*a):
            subprocess.run(["bart", *a], cwd=d, check=True, capture_output=True)

        bart("ecalib", "-m1", "ksp", "maps")  # warm (page cache, first exec)
        t_ecalib, _ = median_time(lambda: bart("ecalib", "-m1", "ksp", "maps"), args.repeats)
        t_pics, _ = median_time(lambda: bart("pics", "-l1", "-r", str(args.lam), "-S", "ksp", "maps", "pics"), args.repeats)
        bart_img = read_cfl(Path(d) / "pics").reshape(n, n).T
    results["bart_ecalib_s"] = t_ecalib
    results["bart_pics_s"] = t_pics
    results["bart_total_s"] = t_ecalib + t_pics
    results["bart_nrmse"] = fitted_nrmse(bart_img, ref, support)
    results["zero_filled_nrmse"] = fitted_nrmse(np.sqrt(np.sum(np.abs(centred_ifft(kspace, (2, 3))) ** 2, 0))[0], ref, support)
    results["ratio_ours_cached_to_bart_total"] = t_cached / results["bart_total_s"]
    results["ratio_ours_with_maps_to_bart_total"] = t_maps / results["bart_total_s"]
    results["ratio_ours_cached_to_bart_pics"] = t_cached / t_pics

    if not args.skip_sigpy:
        import sigpy.mri.app as mr

        maps = g.maps_for(buf)[:, 0]
        t = time.perf_counter()
        sp_img = mr.L1WaveletRecon(kspace[:, 0], maps, args.lam, max_iter=30, show_pbar=False).run()
        results["sigpy_L1WaveletRecon_s"] = time.perf_counter() - t
        results["sigpy_nrmse"] = fitted_nrmse(np.asarray(sp_img), ref, support)

    import scipy
    import sigpy

    doc = {
        "benchmark": "accel_cs",
        "device": "CPU",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "note": "2 cores shared with other jobs: timings noisy"},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                     "sigpy": sigpy.__version__,
                     "bart": subprocess.run(["bart", "version"], capture_output=True, text=True).stdout.strip()},
        "case": {"matrix": n, "coils": args.coils, "acceleration": 4, "acs_lines": acs, "lambda": args.lam,
                 "iterations": 30, "wavelet": "dau2", "repeats": args.repeats, "snr": 40},
        "results": results,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
