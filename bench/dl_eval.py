"""Image quality of the DL reconstruction (E2E-VarNet) vs zero-filling, CG-SENSE and L1-wavelet CS.

Same input for every method (the network's): 8 compressed coils, equispaced ky
undersampling at R = 4, 6, 8, 12 plus ``acs_lines_for(matrix)`` centre lines, scaled by
``models.data.input_scale``. Metrics and the scale fit are those of :mod:`models.evaluate`
(least-squares magnitude scale per image and method, every method alike; NRMSE, PSNR and
SSIM over the object support against the RSS of the fully sampled k-space).

Data:

* tuning (SENSE Tikhonov lambda and CG iterations, CS lambda and FISTA iterations, per R):
  ``--tune-slices`` training-region slices (``make_bank(128, split="train", seeds=(3,))``),
  never the test slices; the chosen values are used below and written out;
* (a) held-out simulated slices: ``make_bank(128, split="test", slices=40, seeds=(7,))``
  (3 orientations x 3 contrasts), SNR 40, pattern offset 0; optionally ``--n256`` slices at
  256 x 256 (``make_bank(256, split="test", slices=30, seeds=(8,))``);
* (b) the real fully sampled scans of ``--data`` (``../shared/data``), retrospectively
  undersampled the same way (prewhitening when a noise scan exists, readout oversampling
  removed, 8 virtual coils); skipped with a message when the folder is absent.

Writes ``bench/results/dl_eval.json`` (with the weights' sha256 and training steps) and
prints markdown tables for the model card.

    .venv/bin/python bench/dl_eval.py [--weights models/weights/varnet_mni152.pt] [--no-tune] [--n256 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import evaluate as ev  # noqa: E402
from models.data import make_bank  # noqa: E402

ACCELERATIONS = (4, 6, 8, 12)
#: fully sampled 2D Cartesian scans of ../shared/data (MANIFEST.md)
REAL_FILES = ("pulseq_gre_16ch_128_phantom.h5", "pulseq_gre_32ch_64x64_phantom.h5", "twix_gre_2ch_2rep_phantom.h5")
METRICS = ("nrmse", "psnr", "ssim")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spread(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)``."""
    return sorted({int(i) for i in np.linspace(0, n_total - 1, min(n, n_total)).round()})


def summarise(results: dict[int, ev.Result]) -> dict:
    out = {}
    for r, res in sorted(results.items()):
        out[str(r)] = {
            "cases": len(res.cases),
            **{m: {f"{k}_{stat}": getattr(res, stat)(m, k) for k in METRICS for stat in ("mean", "std")}
               for m in res.scores},
        }
    return out


def per_case(results: dict[int, ev.Result]) -> dict:
    """Per R: case names and, per method, ``[nrmse, psnr, ssim]`` per case."""
    return {str(r): {"cases": res.cases, "columns": list(METRICS),
                     **{m: [[round(getattr(s, k), 5) for k in METRICS] for s in res.scores[m]] for m in res.scores}}
            for r, res in sorted(results.items())}


def markdown(title: str, summary: dict) -> str:
    lines = [f"**{title}**", "", "| R | method | NRMSE | PSNR [dB] | SSIM |", "|---|---|---|---|---|"]
    for r, row in summary.items():
        for m in ev.METHODS:
            if m not in row:
                continue
            s = row[m]
            lines.append(
                f"| {r} | {m} | {s['nrmse_mean']:.4f} ± {s['nrmse_std']:.4f} | {s['psnr_mean']:.2f} ± {s['psnr_std']:.2f}"
                f" | {s['ssim_mean']:.4f} ± {s['ssim_std']:.4f} |"
            )
    return "\n".join(lines)


def run(cases, net, label: str, settings: tuple[dict, dict]) -> dict[int, ev.Result]:
    t = time.perf_counter()
    results = ev.evaluate(cases, ev.METHODS, net, *settings)
    log(f"{label}: {len(cases)} cases in {time.perf_counter() - t:.0f} s")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=REPO / "models" / "weights" / "varnet_mni152.pt")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dl_eval.json")
    ap.add_argument("--slices", type=int, default=40, help="make_bank slices per volume (held-out: |position| <= 0.1)")
    ap.add_argument("--max-cases", type=int, default=0, help="use at most this many held-out 128 slices (0: all)")
    ap.add_argument("--n256", type=int, default=6, help="held-out 256 x 256 slices (0: none)")
    ap.add_argument("--snr", type=float, default=40.0)
    ap.add_argument("--tune-slices", type=int, default=6, help="training-region slices for the SENSE/CS sweep")
    ap.add_argument("--no-tune", action="store_true", help="use the settings recorded in models/evaluate.py")
    args = ap.parse_args()

    import torch

    if not args.weights.exists():
        sys.exit(f"no weights at {args.weights}: train them first (python -m models.train_varnet)")
    net, meta = ev.load_varnet(args.weights)
    doc: dict = {
        "benchmark": "dl_eval",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights": {"path": str(args.weights.relative_to(REPO)) if args.weights.is_relative_to(REPO) else str(args.weights),
                    "sha256": ev.sha256(args.weights), "config": net.config, "meta": meta},
        "input": "8 virtual coils, equispaced ky + acs_lines_for(matrix) centre lines, pattern offset 0, / input_scale",
        "metrics": "magnitude; one least-squares scale per image and method (all methods) fitted over the object "
                   "support (smoothed reference > 0.1 max); NRMSE, PSNR (peak = reference max) and SSIM (skimage, 7x7, "
                   "mean over the support) over the object support; reference = RSS of the fully sampled k-space "
                   "of the same 8 coils and noise",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "note": "CPU"},
    }

    # -- SENSE / CS settings: tuned on training-region slices ----------------------------
    sense_settings, cs_settings = dict(ev.SENSE_SETTINGS), dict(ev.CS_SETTINGS)
    if not args.no_tune:
        t = time.perf_counter()
        train = make_bank(128, split="train", slices=10, seeds=(3,))
        idx = spread(len(train), args.tune_slices)
        cases = [ev.simulated_case(train, i, r, args.snr, seed=103) for i in idx for r in ACCELERATIONS]
        sense_settings, cs_settings, grid = ev.tune(cases, log)
        doc["tuning"] = {
            "slices": [cases[k].name for k in range(0, len(cases), len(ACCELERATIONS))],
            "bank": "make_bank(128, split='train', slices=10, seeds=(3,))", "snr": args.snr,
            "grid_mean_nrmse": {str(r): g for r, g in grid.items()},
            "seconds": time.perf_counter() - t,
            "recorded_in_models_evaluate_agree": sense_settings == ev.SENSE_SETTINGS and cs_settings == ev.CS_SETTINGS,
        }
        if not doc["tuning"]["recorded_in_models_evaluate_agree"]:
            log("note: the sweep's choice differs from SENSE_SETTINGS/CS_SETTINGS recorded in models/evaluate.py")
    doc["settings"] = {
        "sense": {str(r): dataclasses.asdict(s) for r, s in sorted(sense_settings.items())},
        "cs": {str(r): dataclasses.asdict(s) for r, s in sorted(cs_settings.items())},
        "espirit": {**ev.ESPIRIT, "calib_width": ev.ESPIRIT_CALIB_WIDTH},
    }

    tables = []
    # -- (a) held-out simulated slices ---------------------------------------------------
    t = time.perf_counter()
    bank = make_bank(128, split="test", slices=args.slices, seeds=(7,))
    idx = list(range(len(bank))) if not args.max_cases else spread(len(bank), args.max_cases)
    log(f"test bank 128: {len(bank)} slices ({time.perf_counter() - t:.0f} s), using {len(idx)}")
    cases = [ev.simulated_case(bank, i, r, args.snr, seed=7) for i in idx for r in ACCELERATIONS]
    res = run(cases, net, "simulated 128", (sense_settings, cs_settings))
    summary = summarise(res)
    doc["simulated_128"] = {
        "bank": f"make_bank(128, split='test', slices={args.slices}, seeds=(7,))", "snr": args.snr,
        "slices": len(idx), "orientations": sorted({bank.orientation[i] for i in idx}),
        "contrasts": sorted({bank.contrast[i] for i in idx}), "summary": summary, "per_case": per_case(res),
    }
    tables.append(markdown(f"Held-out simulated slices, 128 x 128, SNR {args.snr:g} ({len(idx)} slices)", summary))

    if args.n256 > 0:
        t = time.perf_counter()
        bank = make_bank(256, split="test", slices=30, seeds=(8,))
        idx = spread(len(bank), args.n256)
        log(f"test bank 256: {len(bank)} slices ({time.perf_counter() - t:.0f} s), using {len(idx)}")
        cases = [ev.simulated_case(bank, i, r, args.snr, seed=8) for i in idx for r in ACCELERATIONS]
        res = run(cases, net, "simulated 256", (sense_settings, cs_settings))
        summary = summarise(res)
        doc["simulated_256"] = {"bank": "make_bank(256, split='test', slices=30, seeds=(8,))", "snr": args.snr,
                                "slices": len(idx), "summary": summary, "per_case": per_case(res)}
        tables.append(markdown(f"Held-out simulated slices, 256 x 256, SNR {args.snr:g} ({len(idx)} slices)", summary))

    # -- (b) real fully sampled scans ---------------------------------------------------
    files = [args.data / f for f in REAL_FILES if (args.data / f).exists()]
    if not files:
        msg = f"real data skipped: none of {', '.join(REAL_FILES)} in {args.data}"
        log(msg)
        doc["real"] = {"skipped": msg}
    else:
        doc["real"] = {}
        for f in files:
            cases = ev.real_cases([f], ACCELERATIONS)
            first = cases[0]
            res = run(cases, net, f.name, (sense_settings, cs_settings))
            summary = summarise(res)
            doc["real"][f.name] = {
                "images": len(res[ACCELERATIONS[0]].cases), "coils": first.kspace.shape[0],
                "matrix_ky_kx": list(first.kspace.shape[1:]), "acs_lines": int(first.acs.sum()),
                "summary": summary, "per_case": per_case(res),
            }
            tables.append(markdown(
                f"Real phantom {f.name} ({first.kspace.shape[0]} coils, {first.kspace.shape[1]} x {first.kspace.shape[2]}, "
                f"{len(res[ACCELERATIONS[0]].cases)} image(s))", summary))

    doc["markdown"] = "\n\n".join(tables)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    settings = "\n".join(
        f"| {r} | {s.lambda_l2:g} | {s.iterations} | {cs_settings[r].lam:g} | {cs_settings[r].iterations} |"
        for r, s in sorted(sense_settings.items())
    )
    print(f"Weights {doc['weights']['path']} sha256 {doc['weights']['sha256'][:16]}..., "
          f"steps {meta.get('steps')}, {doc['date']}\n")
    print("| R | SENSE lambda_l2 | CG iterations | CS lambda | FISTA iterations |\n|---|---|---|---|---|\n" + settings + "\n")
    print(doc["markdown"])


if __name__ == "__main__":
    main()
