"""Per-repetition motion estimation latency against the repetition time of realistic protocols.

    python bench/moco_latency.py [--frames N] [--out bench/results/moco_latency_cpu.json]

For each protocol, a simulated MNI152 object (inline.simulate) shaded by its coil array's
RSS and with Gaussian noise (SNR 30) is the reference; frames are the object moved by known
rigid poses (inline.motion.sim.move_object, k-space shears and phase ramps) under the same
shading with new noise. Timed per frame, the first (warm-up) excluded: registration
(:func:`inline.motion.rigid.register_rigid`, what MotionEstimate runs per image) and
resampling onto the reference (:func:`inline.motion.rigid.resample_rigid`, MocoAverage).
A 2D multi-slice repetition registers every slice in turn, so its latency is slices x the
per-slice time; the motion of a repetition must be known before the next one ends, i.e.
that total must stay below the repetition time. Wall-clock time depends on what else the
machine runs (its load average is recorded); the registering thread's CPU time says what
one dedicated core would take (``fits_one_dedicated_core``). The estimation error of each frame is
reported alongside (bench/moco_accuracy.py does accuracy properly).

Registration runs on the host (SimpleITK); the measurement below is why no GPU
registration was written. Writes JSON naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inline.motion.rigid import RigidMotion, register_rigid, resample_rigid  # noqa: E402
from inline.motion.sim import move_object  # noqa: E402
from inline.simulate import simulate_scan  # noqa: E402

#: name, matrix (x = y), slices (2D) or partitions (3D), 3D?, repetition time [s], what it stands for, metric
#: sampling (None: register_rigid's default; MotionEstimate's ``sampling`` parameter)
PROTOCOLS = [
    ("2D real-time GRE, 1 slice 128^2", 128, 1, False, 1.0, "dynamic single slice, 128 lines x TR 8 ms", None),
    ("2D EPI fMRI, 36 slices 64^2", 64, 36, False, 2.0, "BOLD time series, TR 2 s", None),
    ("2D EPI fMRI, 36 slices 64^2, sampling 0.5", 64, 36, False, 2.0, "the same, metric on half the pixels", 0.5),
    ("2D EPI fMRI, 36 slices 64^2, stack_slices", 64, 36, "stack", 2.0, "the same, slices registered as one volume",
     None),
    ("2D GRE T1w, 20 slices 256^2", 256, 20, False, 64.0, "256 lines x TR 250 ms per repetition", None),
    ("2D TSE T2w, 20 slices 256^2", 256, 20, False, 64.0, "256 lines / ETL 16 x TR 4 s", None),
    ("3D EPI fMRI, 64^2 x 32", 64, 32, True, 2.5, "3D-EPI volume TR 2.5 s", None),
    ("3D GRE T1w, 128^2 x 64", 128, 64, True, 65.5, "128 x 64 lines x TR 8 ms", None),
]


def _object(matrix: int, depth: int, three_d: bool | str, seed: int):
    """Magnitude object times coil RSS ``(z, y, x)``, spacing ``(dz, dy, dx)`` [m], noise std.

    ``three_d``: True a 3D slab of ``depth`` partitions; False one 2D slice; "stack" ``depth``
    2D slices (MotionEstimate ``stack_slices``), z spacing the simulator's slice spacing.
    """
    thickness = 240.0 / matrix if three_d is True else 3.0
    stack = three_d == "stack"
    scan = simulate_scan(matrix=matrix, slices=depth if stack else 1, kz=depth if three_d is True else 1, coils=8,
                         repetitions=1, slice_thickness_mm=thickness, noise_samples=0, snr=float("inf"), seed=seed)
    rss = np.sqrt((np.abs(scan.coil_maps) ** 2).sum(axis=0))
    dz = thickness
    if stack:
        dz = next(p.value for p in scan.header.userParameters.userParameterDouble if p.name == "slice_spacing_mm")
    spacing = (dz * 1e-3, 240e-3 / matrix, 240e-3 / matrix)
    obj = scan.images
    sigma = float(np.abs(obj * rss)[scan.brain_mask].mean()) / 30.0
    return obj, rss, spacing, sigma


def _frame(obj, rss, spacing, pose, sigma, rng):
    nz, ny, nx = obj.shape
    pz = nz // 2 if nz > 1 else 0
    padded = np.pad(obj, ((pz, pz), (ny // 2, ny // 2), (nx // 2, nx // 2)))
    moved = move_object(padded, pose, spacing)[pz : pz + nz, ny // 2 : ny // 2 + ny, nx // 2 : nx // 2 + nx]
    noisy = moved * rss + sigma * (rng.standard_normal(obj.shape) + 1j * rng.standard_normal(obj.shape))
    return np.abs(noisy).astype(np.float32)


def _poses(n: int, three_d: bool | str, rng) -> list[RigidMotion]:
    out = []
    for _ in range(n):
        t = rng.uniform(-3, 3, 3)
        r = rng.uniform(-3, 3, 3)
        if three_d is not True:  # 2D slices (stacked or not): in-plane motion
            t[2] = r[0] = r[1] = 0.0
        out.append(RigidMotion.from_mm_deg(t, r))
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    v = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(v, 50)), 2), "p95": round(float(np.percentile(v, 95)), 2),
            "max": round(float(v.max()), 2)}


def run(frames: int) -> dict:
    cases = []
    for name, matrix, depth, three_d, tr_s, what, sampling in PROTOCOLS:
        rng = np.random.default_rng(0)
        obj, rss, spacing, sigma = _object(matrix, depth, three_d, seed=1)
        # 2D: one representative slice (z = 1), its time counted once per slice of the protocol
        noise = rng.standard_normal(obj.shape) + 1j * rng.standard_normal(obj.shape)
        reference = np.abs(obj * rss + sigma * noise).astype(np.float32)
        reg_s, cpu_s, res_s, t_err, r_err = [], [], [], [], []
        for i, pose in enumerate(_poses(frames + 1, three_d, rng)):
            moving = _frame(obj, rss, spacing, pose, sigma, rng)
            t0, c0 = time.perf_counter(), time.thread_time()
            est = register_rigid(reference, moving, spacing, sampling=sampling).motion  # 1 ITK thread: thread CPU time
            t1, c1 = time.perf_counter(), time.thread_time()
            resample_rigid(moving[None], est, spacing)
            t2 = time.perf_counter()
            if i == 0:
                continue  # warm-up
            reg_s.append(t1 - t0)
            cpu_s.append(c1 - c0)
            res_s.append(t2 - t1)
            px = np.asarray(spacing)[::-1] * 1e3
            t_err.append(np.abs((est.translation_mm - pose.translation_mm) / px).max())
            r_err.append(np.abs(est.rotation_deg - pose.rotation_deg).max())
        per_frame = float(np.median(reg_s))
        per_rep_images = 1 if three_d else depth  # a slab or a stack is one registration per repetition
        per_rep = per_frame * per_rep_images
        p95_rep = float(np.percentile(reg_s, 95)) * per_rep_images
        cpu_rep = float(np.percentile(cpu_s, 95)) * per_rep_images
        cases.append({
            "protocol": name,
            "what": what,
            "matrix": [matrix, matrix, depth] if three_d is True else [matrix, matrix],
            "slices": 1 if three_d is True else depth,
            "dimensions": 2 if three_d is False else 3,
            "stack_slices": three_d == "stack",
            "sampling": sampling,
            "repetition_time_s": tr_s,
            "frames_timed": len(reg_s),
            "registration_ms_per_image": _percentiles(reg_s),
            "registration_cpu_ms_per_image": _percentiles(cpu_s),
            "resampling_ms_per_image": _percentiles(res_s),
            "registration_ms_per_repetition_p50": round(per_rep * 1e3, 1),
            "registration_ms_per_repetition_p95": round(p95_rep * 1e3, 1),
            "fraction_of_repetition_time_p95": round(p95_rep / tr_s, 3),
            "reported_before_next_repetition_ends": bool(p95_rep < tr_s),
            "registration_cpu_ms_per_repetition_p95": round(cpu_rep * 1e3, 1),
            "fits_one_dedicated_core": bool(cpu_rep < tr_s),
            "max_error_px": round(float(np.max(t_err)), 4),
            "max_error_deg": round(float(np.max(r_err)), 4),
        })
        print(json.dumps(cases[-1]), flush=True)
    return {"cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=5, help="timed frames per protocol (plus one warm-up)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "moco_latency_cpu.json")
    args = ap.parse_args()
    import SimpleITK as sitk

    result = {
        "benchmark": "per-repetition rigid registration latency (MotionEstimate) and resampling (MocoAverage)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "device": "CPU", "registration_threads": 1,
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "versions": {"numpy": np.__version__, "SimpleITK": sitk.Version.VersionString()},
        "method": "SimpleITK Euler2D/3D, normalised correlation, 3-level pyramid, local intensity normalisation, "
                  "one ITK thread; cubic B-spline resampling (scipy.ndimage). Wall-clock per image (the machine is "
                  "shared: load average at start above) and the registering thread's CPU time. Warm-up frame "
                  "excluded. 2D repetitions: slices x per-slice wall-clock (the gadget registers slices one after "
                  "another).",
        "gpu": "none lent to this run; registration stays on the host (SimpleITK), see the fractions of the "
               "repetition time: no GPU registration was needed. Resampling follows the data onto a GPU (CuPy).",
        **run(args.frames),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
