"""Per-slice DL inference latency per backend: cold start (new process) vs warm.

    python bench/dl_latency.py [--repeats 20] [--threads 1] [--note TEXT] [--out bench/results/dl_latency_cpu.json]

Input: one 256 x 256 slice, 8 coils, R=4 equispaced along ky plus 24 ACS lines (an ellipse
phantom with smooth coil sensitivities, scaled like the gadget scales: 99th percentile of
the ACS image). Model: the shipped checkpoint ``models/weights/varnet_mni152.pt`` when present
(copied to a snapshot first: training rewrites it), else a random VarNet with its config
(cascades 8, chans 8, pools 3, sens_chans 0).

Cases: on the CPU eager fp32, eager bf16 and ONNX Runtime fp32 (eager fp16 has no fast CPU
kernels: tens of seconds per slice, skipped); on a GPU also eager fp16, torch.compile with
CUDA graphs (fp32, fp16), ONNX Runtime with the CUDA provider and TensorRT (fp32, fp16)
where installed. Each case is measured

* cold, empty disk cache: a new process imports, loads + verifies the weights, builds
  (export / compile / engine) and runs the first slice; wall time from the parent incl. the
  interpreter's start, and the child's own phases;
* cold, disk cache filled (ONNX Runtime, TensorRT): the same with the export/engine on disk;
* warm: in this process after warm-up, ``--repeats`` calls of ``LoadedModel.run`` with NumPy
  in and out (host<->device copies included); median and p95. Also the NRMSE of the output
  k-space vs eager fp32.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = (1, 8, 256, 256)
ACCELERATION, ACS_LINES = 4, 24
CONFIG = dict(cascades=8, chans=8, pools=3, sens_chans=0)
WEIGHTS = REPO / "models" / "weights" / "varnet_mni152.pt"


def slice_inputs(seed: int = 0):
    """``(kspace, mask, acs_mask)`` NumPy arrays of :data:`SHAPE`, scaled so the image is O(1)."""
    import numpy as np

    from models.data import equispaced_mask, fft2c, input_scale

    _, coils, n, _ = SHAPE
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    image = np.zeros((n, n), np.complex64)
    for cx, cy, ax, ay, value in [(0, 0, 0.69, 0.92, 1.0), (0, -0.02, 0.66, 0.87, -0.6), (0.22, 0, 0.11, 0.31, 0.3),
                                  (-0.22, 0, 0.16, 0.41, 0.3), (0, 0.35, 0.21, 0.25, 0.2), (0.1, -0.4, 0.05, 0.05, 0.4)]:  # fmt: skip
        image += value * (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1)
    image *= np.exp(1j * np.pi * 0.3 * x)  # smooth background phase
    angles = np.linspace(0, 2 * np.pi, coils, endpoint=False)
    maps = np.stack([np.exp(-((x - 1.3 * np.cos(a)) ** 2 + (y - 1.3 * np.sin(a)) ** 2) / 1.5) * np.exp(1j * a) for a in angles])
    k = fft2c(maps * image)
    k = k + 0.002 * np.abs(k).max() * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    sampled, acs = equispaced_mask(n, ACCELERATION, ACS_LINES)
    k = (k * sampled[None, :, None]).astype(np.complex64)
    k /= input_scale(k, acs)
    mask = sampled.astype(np.float32).reshape(1, 1, n, 1)
    return k[None].astype(np.complex64), mask, acs.astype(np.float32).reshape(1, 1, n, 1)


def snapshot_model(workdir: Path) -> tuple[Path, str]:
    """A stable copy of the shipped checkpoint, else a random model with its config; and what it is."""
    import torch

    from models.varnet import VarNet

    target = workdir / "model.pt"
    if WEIGHTS.is_file():
        shutil.copyfile(WEIGHTS, target)
        meta = torch.load(target, weights_only=True).get("meta", {})
        return target, f"{WEIGHTS.relative_to(REPO)} snapshot (training steps {meta.get('steps')}, val NRMSE R=8 {meta.get('val_nrmse_r8')})"
    torch.manual_seed(0)
    net = VarNet(**CONFIG)
    torch.save({"config": net.config, "state_dict": net.state_dict(), "meta": {}}, target)
    return target, f"random VarNet {CONFIG} ({WEIGHTS.relative_to(REPO)} absent)"


def cold_child(args: argparse.Namespace) -> None:
    """Run in a new process: import, load, build, first call; print the phases as JSON."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from inline.inference import ModelSpec, get_model

    t_imported = time.perf_counter()
    backend, precision = args.cold.split(":")
    spec = ModelSpec("bench", Path(args.weights), args.sha256)
    model = get_model(spec, [backend], args.device, precision, cache_dir=args.cache_dir, intra_op_threads=args.threads)
    t_loaded = time.perf_counter()
    model.run(*slice_inputs())
    t_first = time.perf_counter()
    print(json.dumps({
        "import_s": t_imported - T_START, "get_model_s": t_loaded - t_imported, "first_call_s": t_first - t_loaded,
        "in_process_s": t_first - T_START, "backend": model.backend,
    }))  # fmt: skip


def run_cold(case: str, args: argparse.Namespace, weights: Path, sha256: str, cache_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--cold", case, "--weights", str(weights), "--sha256", sha256, "--device", args.device,
           "--cache-dir", str(cache_dir), "--threads", str(args.threads)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cold run {case} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = wall
    return row


def warm(model, inputs, repeats: int) -> tuple[dict, object]:
    import numpy as np

    out = model.run(*inputs)
    model.run(*inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.run(*inputs)  # NumPy out: includes the device->host copy and synchronisation
        times.append(1e3 * (time.perf_counter() - t0))
    v = np.asarray(times)
    stats = {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)), "min": float(v.min()), "mean": float(v.mean()), "n": int(v.size)}
    return stats, out


def _stats(times: list[float]) -> dict:
    import numpy as np

    v = np.asarray(times)
    return {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)), "min": float(v.min()), "n": int(v.size)}


def refine_timing(inputs, repeats: int) -> dict:
    """The closing SENSE step of ``DLRecon`` (gadgets.dl_refine) on the same slice, warm, in this
    thread: ESPIRiT maps and the CG solve (the network's own time is in the cases above; the
    step's prior here is the zero-filled k-space, which costs the CG the same per iteration).
    Network + step per slice as the server runs it is measured by ``inline bench --case
    dl_r8_2d_32ch_256`` (per-gadget ``DLRecon``): calling the network from a second thread of this
    process, as the gadget does, gives each thread its own OpenMP team and their spinning
    threads slow both, which a server does not see."""
    from gadgets.dl_refine import REFINE_GRID, REFINE_ITERATIONS, refine_maps, sense_refine

    k, mask, acs = inputs
    kspace, sampled, acs_lines = k[0], mask[0, 0, :, 0] > 0, acs[0, 0, :, 0] > 0
    maps_t, cg_t, iterations = [], [], 0
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        maps = refine_maps(kspace, acs_lines)
        t1 = time.perf_counter()
        _, iterations = sense_refine(kspace, kspace, sampled, maps, iterations=REFINE_ITERATIONS, tolerance=0.0)
        t2 = time.perf_counter()
        if i:  # the first is a warm-up
            maps_t.append(1e3 * (t1 - t0))
            cg_t.append(1e3 * (t2 - t1))
    return {"what": f"ESPIRiT maps (kernel 6, 24 calibration lines, grid {REFINE_GRID}) and CG (lambda 0.03, "
                    f"{REFINE_ITERATIONS} iterations) on one 256 x 256 slice of 8 coils, warm",
            "cg_iterations": iterations, "maps_ms": _stats(maps_t), "cg_ms": _stats(cg_t)}


def device_info(device: str, threads: int) -> dict:
    import onnxruntime
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    info = {
        "device": device, "cpu_model": cpu, "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "requested_threads": threads or "default",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    for module in ("tensorrt", "torch_tensorrt", "cupy"):
        try:
            info["versions"][module] = __import__(module).__version__
        except ImportError:
            pass
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime intra-op threads (0: their defaults)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--note", default="", help="free text recorded with the results (e.g. concurrent load)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cold", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--sha256", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cold:
        return cold_child(args)

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from inline.inference import BACKENDS, ModelSpec, clear_cache, get_model
    from inline.inference.spec import sha256_file

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = args.device.startswith("cuda")
    out_path = args.out or REPO / "bench" / "results" / f"dl_latency_{'gpu' if on_gpu else 'cpu'}.json"
    if on_gpu:
        cases = [("eager", "fp32"), ("eager", "fp16"), ("eager", "bf16"), ("compile", "fp32"), ("compile", "fp16"),
                 ("onnxruntime", "fp32"), ("tensorrt", "fp32"), ("tensorrt", "fp16")]  # fmt: skip
    else:
        cases = [("eager", "fp32"), ("eager", "bf16"), ("onnxruntime", "fp32")]
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="dl_latency_"))
    weights, model_desc = snapshot_model(workdir)
    sha256 = sha256_file(weights)
    spec = ModelSpec("bench", weights, sha256)
    inputs = slice_inputs()
    reference = None
    rows = []
    for backend, precision in cases:
        case = f"{backend}:{precision}"
        reason = BACKENDS[backend].unavailable_reason(torch.device(args.device), precision)
        if reason:
            rows.append({"backend": backend, "precision": precision, "status": "unavailable", "reason": reason})
            print(f"{case:18s} unavailable: {reason}")
            continue
        cache_dir = workdir / f"cache_{backend}_{precision}"
        row: dict = {"backend": backend, "precision": precision, "status": "ok"}
        row["cold_empty_cache"] = run_cold(case, args, weights, sha256, cache_dir)
        if backend in ("onnxruntime", "tensorrt"):
            row["cold_disk_cache"] = run_cold(case, args, weights, sha256, cache_dir)
        clear_cache()
        model = get_model(spec, [backend], args.device, precision, cache_dir=cache_dir, intra_op_threads=args.threads, warm_up=[SHAPE])
        row["warm_ms"], out = warm(model, inputs, args.repeats)
        if reference is None and (backend, precision) == ("eager", "fp32"):
            reference = out
        if reference is not None:
            row["nrmse_vs_eager_fp32"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        rows.append(row)
        cold = row["cold_empty_cache"]
        print(f"{case:18s} warm median {row['warm_ms']['median']:8.1f} ms  p95 {row['warm_ms']['p95']:8.1f} ms  "
              f"cold {cold['process_wall_s']:6.1f} s (import {cold['import_s']:.1f}, load+build {cold['get_model_s']:.1f}, "
              f"first call {cold['first_call_s']:.1f})  NRMSE {row.get('nrmse_vs_eager_fp32', float('nan')):.1e}", flush=True)  # fmt: skip
    refine = refine_timing(inputs, args.repeats)
    print(f"SENSE step: maps {refine['maps_ms']['median']:.1f} ms, CG {refine['cg_ms']['median']:.1f} ms "
          f"({refine['cg_iterations']} iterations)", flush=True)
    result = {
        "benchmark": "DL inference latency per slice (E2E-VarNet), cold start in a new process vs warm",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": device_info(args.device, args.threads),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "note": args.note,
        "model": {"description": model_desc, "sha256": sha256, "config": CONFIG},
        "input": {"shape": list(SHAPE), "acceleration": ACCELERATION, "acs_lines": ACS_LINES, "arrays": "numpy in, numpy out"},
        "cases": rows,
        "sense_step": refine,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
