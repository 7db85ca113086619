"""QC evaluation: sensitivity, false alerts and alert latency of the QC chain on injected faults.

    python bench/qc_eval.py [--bases 400] [--faults-per-base 2] [--config qc]
                            [--out bench/results/qc_eval_cpu.json] [--doc docs/qc_evaluation.md]

Cases. Clean scans: small simulated brains (:func:`inline.simulate.simulate_scan`, 64 x 64,
4-8 coils, 1-4 slices, axial/sagittal/coronal, T1w/T2w/PD, SNR 20-80, FOV 200-240 mm, one
or two repetitions, one seed each) and the Cartesian real files of ``../shared/data`` (the
EPI file is left out: the QC chain is the default Cartesian one, without EPI correction).
Faulty scans: each clean scan with faults from :mod:`inline.qc.faults`, every kind at
several sizes, from sub-visible to severe (:data:`FAULT_SPECS`); simulated scans take the
specs in turn, real files every spec. Every case runs through the QC chain
(``configs/qc.yaml``) with :func:`inline.offline.run_chain`.

Metrics, per alert code. Sensitivity: fraction of the faulty cases of a kind (and size)
that raised the kind's code (:data:`inline.qc.faults.EXPECTED_CODE`), other codes
notwithstanding. False-alert rate: fraction of the clean cases raising that code at all.
Alert latency: ``detected_ns - revealed_ns`` of every alert (detection after the arrival of
the readout that revealed the fault). The offline runner feeds the readouts as fast as it
can, not at scanner pace, so a readout may wait in the chain's queues behind earlier ones:
these latencies are an upper bound of the live ones for the same compute. Publish latency
(detection to leaving the chain) is not measured: :class:`inline.offline.RunResult` keeps
alerts without their arrival time at the sink.

The live alert latency (scanner pace, real socket, to the bus) is measured by
``bench/qc_latency.py``; this module's markdown also tabulates its results and those of
``bench/qc_overhead.py`` (CPU per slice of the QC taps) when their JSON files exist.

Targets (:func:`check_targets`), for faults of clinically visible size (``visible`` in
:data:`FAULT_SPECS`): sensitivity >= 95 % per kind, false alerts <= 2 % per code on clean
scans, alert latency p99 <= 100 ms per code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from inline.config import ChainSpec, load_chain  # noqa: E402
from inline.mrdfile import RawScan, read_scan  # noqa: E402
from inline.offline import run_chain  # noqa: E402
from inline.qc import faults  # noqa: E402
from inline.simulate import simulate_scan  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
#: Real files used (Cartesian); the EPI file needs the EPI chain.
REAL_FILES = (
    "pulseq_gre_32ch_64x64_phantom.h5",
    "pulseq_gre_16ch_128_phantom.h5",
    "siemens_skyra_ssfp_14ch_R3_phantom.h5",
    "twix_gre_2ch_2rep_phantom.h5",
)

TARGET_SENSITIVITY = 0.95
TARGET_FALSE_ALERT_RATE = 0.02
TARGET_LATENCY_P99_MS = 100.0
#: Codes whose visible-size sensitivity is still below target (numbers in docs/qc_evaluation.md);
#: tests/test_qc_evaluation.py asserts every other target (a code leaves this list once it meets its target).
#: motion: mid-scan motion in a single repetition is not found reliably (between repetitions: 100 %).
#: coil_noise / low_snr: met on the full bench (sim-dominated), not on the real files without a noise scan
#: (32-channel: both; 16-channel: coil_noise 4x), which weigh 4 of 11 cases per size in the test's smaller set.
#: rf_spike: meets the target on the full bench (98 %) but not on the test's subset (~94 %: single 0.1 x
#: spikes on the echo peak, where the neighbouring line is as large as the spike).
#: ghosting: meets it on the full bench (sim-dominated) but not on the test's subset, where the real
#: 32-channel phantom (an object filling the FOV along phase encoding: no background for the ghost fit)
#: is 1 of 11 cases per size.
KNOWN_SENSITIVITY_MISSES = ("motion", "ghosting", "coil_noise", "low_snr", "rf_spike")


@dataclass(frozen=True)
class FaultSpec:
    """One fault kind at one size.

    Attributes:
        kind: fault kind (:data:`inline.qc.faults.EXPECTED_CODE` key).
        size: human-readable size, e.g. ``"0.1 x peak"``, ``"2 mm"``.
        visible: clinically visible size: counts towards the sensitivity target.
        inject: ``(scan, rng, coils) -> Injection``.
        needs_repetitions: applies only to scans with two or more repetitions.
        needs_snr: ``inject`` takes a fourth argument, the clean scan's true SNR (simulated:
            the simulator's ``snr``; real files: ImageQC's SNR measured on the clean case).
    """

    kind: str
    size: str
    visible: bool
    inject: Callable[[RawScan, np.random.Generator, int], faults.Injection]
    needs_repetitions: bool = False
    needs_snr: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind} {self.size}"


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def _translation(mm: float, rng: np.random.Generator) -> tuple[float, float]:
    """``mm`` along a random in-plane direction (readout, phase or diagonal), random sign."""
    angle = rng.choice([0.0, 0.5, 0.25, 0.75]) * math.pi + rng.choice([0.0, math.pi])
    return (mm * math.cos(angle), mm * math.sin(angle))


def _spike(amp: float, n: int) -> Callable:
    return lambda s, rng, coils: faults.rf_spike(s, amplitude_rel=amp, n_spikes=n, seed=_seed(rng))


def _motion(mm: float = 0.0, deg: float = 0.0) -> Callable:
    def inject(s, rng, coils):
        sign = rng.choice([-1.0, 1.0])
        return faults.rigid_motion(
            s, at_fraction=float(rng.uniform(0.3, 0.7)), translation_mm=_translation(mm, rng), rotation_deg=sign * deg
        )

    return inject


def _to_snr(target: float) -> Callable:
    """Raised noise bringing the scan's true SNR to ``target`` (factor = SNR / target, at least 1)."""
    return lambda s, rng, coils, snr: faults.raised_noise(s, factor=max(1.0, snr / target), seed=_seed(rng))


def _rep_motion(mm: float = 0.0, deg: float = 0.0) -> Callable:
    return lambda s, rng, coils: faults.repetition_motion(
        s, repetition=1, translation_mm=_translation(mm, rng), rotation_deg=deg * rng.choice([-1.0, 1.0])
    )


#: Every fault kind at several sizes; ``visible`` marks the clinically visible ones.
FAULT_SPECS: tuple[FaultSpec, ...] = (
    FaultSpec("rf_spike", "0.02 x peak, 1 spike", False, _spike(0.02, 1)),
    FaultSpec("rf_spike", "0.05 x peak, 1 spike", False, _spike(0.05, 1)),
    FaultSpec("rf_spike", "0.1 x peak, 1 spike", True, _spike(0.1, 1)),
    FaultSpec("rf_spike", "0.5 x peak, 1 spike", True, _spike(0.5, 1)),
    FaultSpec("rf_spike", "0.1 x peak, 3 spikes", True, _spike(0.1, 3)),
    FaultSpec("dead_coil", "zeros from 50%", True,
              lambda s, rng, c: faults.dead_coil(s, channel=int(rng.integers(c)), from_fraction=0.5)),
    FaultSpec("dead_coil", "zeros, whole scan", True,
              lambda s, rng, c: faults.dead_coil(s, channel=int(rng.integers(c)), from_fraction=0.0)),
    FaultSpec("dead_coil", "noise only from 30%", True,
              lambda s, rng, c: faults.dead_coil(s, channel=int(rng.integers(c)), from_fraction=0.3, mode="noise",
                                                 seed=_seed(rng))),
    FaultSpec("noisy_coil", "1.5 x noise std", False,
              lambda s, rng, c: faults.noisy_coil(s, channel=int(rng.integers(c)), factor=1.5, seed=_seed(rng))),
    FaultSpec("noisy_coil", "2 x noise std", False,
              lambda s, rng, c: faults.noisy_coil(s, channel=int(rng.integers(c)), factor=2.0, seed=_seed(rng))),
    FaultSpec("noisy_coil", "3 x noise std", True,
              lambda s, rng, c: faults.noisy_coil(s, channel=int(rng.integers(c)), factor=3.0, seed=_seed(rng))),
    FaultSpec("noisy_coil", "4 x noise std", True,
              lambda s, rng, c: faults.noisy_coil(s, channel=int(rng.integers(c)), factor=4.0, seed=_seed(rng))),
    FaultSpec("motion", "1 mm mid-scan", False, _motion(mm=1.0)),
    FaultSpec("motion", "2 mm mid-scan", True, _motion(mm=2.0)),
    FaultSpec("motion", "5 mm mid-scan", True, _motion(mm=5.0)),
    FaultSpec("motion", "1 deg mid-scan", False, _motion(deg=1.0)),
    FaultSpec("motion", "2 deg mid-scan", True, _motion(deg=2.0)),
    FaultSpec("motion", "5 deg mid-scan", True, _motion(deg=5.0)),
    FaultSpec("motion", "2 mm between repetitions", True, _rep_motion(mm=2.0), needs_repetitions=True),
    FaultSpec("motion", "2 deg between repetitions", True, _rep_motion(deg=2.0), needs_repetitions=True),
    FaultSpec("raised_noise", "to SNR 12", False, _to_snr(12.0), needs_snr=True),
    FaultSpec("raised_noise", "to SNR 8", True, _to_snr(8.0), needs_snr=True),
    FaultSpec("raised_noise", "to SNR 5", True, _to_snr(5.0), needs_snr=True),
    FaultSpec("missing_lines", "1 line random", False,
              lambda s, rng, c: faults.missing_lines(s, n_lines=1, region="random", seed=_seed(rng))),
    FaultSpec("missing_lines", "5% random", True,
              lambda s, rng, c: faults.missing_lines(s, fraction=0.05, region="random", seed=_seed(rng))),
    FaultSpec("missing_lines", "5% centre", True,
              lambda s, rng, c: faults.missing_lines(s, fraction=0.05, region="centre")),
    FaultSpec("missing_lines", "10% edge (aborted)", True,
              lambda s, rng, c: faults.missing_lines(s, fraction=0.10, region="edge")),
    FaultSpec("nyquist_ghost", "0.1 rad (5% ghost)", False, lambda s, rng, c: faults.nyquist_ghost(s, phase_rad=0.1)),
    FaultSpec("nyquist_ghost", "0.3 rad (15% ghost)", True, lambda s, rng, c: faults.nyquist_ghost(s, phase_rad=0.3)),
    FaultSpec("nyquist_ghost", "0.6 rad (31% ghost)", True, lambda s, rng, c: faults.nyquist_ghost(s, phase_rad=0.6)),
)

VISIBLE_DEFINITION = {
    "rf_spike": "spike >= 0.1 x the slice's k-space peak",
    "dead_coil": "any dead channel (zeros or noise only), from the start or mid-scan",
    "noisy_coil": "channel noise std >= 3 x its own (channels of one array routinely differ by up to ~2x in noise, "
                  "so a channel at 2x its own level is within what a healthy array shows, not a fault)",
    "motion": "rigid in-plane motion >= 2 mm or >= 2 deg, mid-scan or between repetitions",
    "raised_noise": "resulting true SNR below the low_snr warning threshold (10): the alert is about absolute "
                    "image quality, so noise x2 on an SNR-80 scan (SNR 40) is no clinical problem. True SNR = the "
                    "simulator's snr / factor; real files: the SNR ImageQC measures on the clean case / factor. "
                    "Cases are made to land at SNR 8 and 5 (visible) and 12 (sub-visible: 10-12 is the estimator's "
                    "uncertainty band, per-slice SNR of a simulated scan differs from its global snr by up to -30 %)",
    "missing_lines": ">= 5% of the k-space lines of a slice missing",
    "nyquist_ghost": "odd/even line phase error >= 0.3 rad (ghost >= 15% of the object)",
}


@dataclass
class Case:
    """One evaluation case: a clean scan or a scan with one injected fault."""

    name: str
    source: str  # "sim" or "real"
    scan: RawScan
    kind: str | None = None  # None: clean
    size: str = ""
    visible: bool = False
    injection: faults.Injection | None = None


@dataclass
class CaseResult:
    name: str
    source: str
    kind: str | None
    size: str
    visible: bool
    expected: str | None
    codes: list[str]
    latencies_ms: list[tuple[str, float]]
    images: int
    run_s: float
    error: str | None = None

    @property
    def detected(self) -> bool:
        return self.expected is not None and self.expected in self.codes


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


def sim_variant(j: int) -> dict[str, Any]:
    """Parameters of simulated clean scan ``j``: cycles of co-prime lengths over the settings."""
    return dict(
        matrix=64,
        coils=(4, 6, 8)[j % 3],
        slices=(1, 2, 1, 3, 2, 4, 1)[j % 7],
        orientation=("axial", "sagittal", "coronal")[(j // 3) % 3],
        contrast=("t1w", "t2w", "pd")[(j // 2) % 3],
        snr=(20.0, 30.0, 50.0, 80.0, 40.0)[j % 5],
        fov_mm=(240.0, 220.0, 200.0)[(j // 5) % 3],
        repetitions=2 if j % 4 == 3 else 1,
        seed=1000 + j,
    )


def _coils(scan: RawScan) -> int:
    return scan.acquisitions[-1].active_channels


def _repetitions(scan: RawScan) -> int:
    return len({a.idx.repetition for a in scan.acquisitions})


def measure_snr(scan: RawScan, config: str | Path = "qc") -> float:
    """ImageQC's SNR of a clean scan (median over its images), run with the low_snr threshold out of the way."""
    res = run_chain(load_chain(config), scan, {"snr_warning": 1e12, "snr_critical": 1e-12})
    vals = [a.value for a in res.alerts if a.code.value == "low_snr"]
    return float(np.median(vals)) if vals else float("inf")


def _faulty(scan: RawScan, name: str, source: str, spec: FaultSpec, rng: np.random.Generator,
            snr: float | None = None) -> Case:
    if spec.needs_snr:
        inj = spec.inject(scan, rng, _coils(scan), snr)
        name = f"{name} (snr {snr:.1f})"
    else:
        inj = spec.inject(scan, rng, _coils(scan))
    return Case(f"{name} + {spec.label}", source, inj.scan, spec.kind, spec.size, spec.visible, inj)


def generate_cases(
    n_bases: int = 200,
    faults_per_base: int = 1,
    real: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: None,
    config: str | Path = "qc",
) -> Iterator[Case]:
    """Clean and faulty cases, lazily (a simulated scan is made once, then its faulty variants).

    Simulated bases take the fault specs in turn (``faults_per_base`` each, specs needing
    repetitions given only to two-repetition scans, which also get one of those extra);
    each real file gets every applicable spec.
    """
    rng = np.random.default_rng(seed)
    plain = [s for s in FAULT_SPECS if not s.needs_repetitions]
    rep_specs = [s for s in FAULT_SPECS if s.needs_repetitions]
    turn, rep_turn = 0, 0
    for j in range(n_bases):
        v = sim_variant(j)
        sim = simulate_scan(**v)
        scan = RawScan(sim.header_xml, list(sim.acquisitions))
        name = "sim{seed} {coils}ch {slices}sl {orientation} {contrast} snr{snr:g} fov{fov_mm:g} rep{repetitions}".format(**v)
        yield Case(name, "sim", scan)
        for _ in range(faults_per_base):
            spec = plain[turn % len(plain)]
            turn += 1
            yield _faulty(scan, name, "sim", spec, rng, snr=v["snr"])
        if _repetitions(scan) > 1:
            spec = rep_specs[rep_turn % len(rep_specs)]
            rep_turn += 1
            yield _faulty(scan, name, "sim", spec, rng)
    if not real:
        return
    for fname in REAL_FILES:
        path = SHARED_DATA / fname
        if not path.exists():
            log(f"skipping real file {path}: not found")
            continue
        scan = read_scan(path)
        yield Case(fname, "real", scan)
        snr = measure_snr(scan, config)
        for spec in FAULT_SPECS:
            if spec.needs_repetitions and _repetitions(scan) < 2:
                continue
            yield _faulty(scan, fname, "real", spec, rng, snr=snr)


# --------------------------------------------------------------------------------------
# Running and summarising
# --------------------------------------------------------------------------------------


def run_case(spec: ChainSpec, case: Case) -> CaseResult:
    t0 = time.perf_counter()
    expected = faults.EXPECTED_CODE[case.kind].value if case.kind else None
    try:
        res = run_chain(spec, case.scan)
    except Exception as e:  # noqa: BLE001 - a failing case is a result, reported
        return CaseResult(case.name, case.source, case.kind, case.size, case.visible, expected, [], [], 0,
                          time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
    codes = sorted({a.code.value for a in res.alerts})
    lat = [(a.code.value, (a.detected_ns - a.revealed_ns) / 1e6) for a in res.alerts]
    return CaseResult(case.name, case.source, case.kind, case.size, case.visible, expected, codes, lat,
                      len(res.images), time.perf_counter() - t0)


def evaluate(
    config: str | Path = "qc",
    n_bases: int = 200,
    faults_per_base: int = 1,
    real: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: None,
) -> list[CaseResult]:
    """Generate the cases and run each through the chain ``config``."""
    spec = load_chain(config)
    out = []
    for case in generate_cases(n_bases, faults_per_base, real, seed, log, config):
        out.append(run_case(spec, case))
    return out


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(results: list[CaseResult]) -> dict[str, Any]:
    """Per (kind, size) rows, per code metrics, totals."""
    clean = [r for r in results if r.kind is None]
    faulty = [r for r in results if r.kind is not None]
    rows = []
    by_spec: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for r in faulty:
        by_spec[(r.kind, r.size)].append(r)
    for spec in FAULT_SPECS:
        rs = by_spec.get((spec.kind, spec.size), [])
        if not rs:
            continue
        hit = [r for r in rs if r.detected]
        others = Counter(c for r in rs for c in r.codes if c != r.expected)
        rows.append({
            "kind": spec.kind, "size": spec.size, "visible": spec.visible,
            "code": faults.EXPECTED_CODE[spec.kind].value, "cases": len(rs), "detected": len(hit),
            "sensitivity": len(hit) / len(rs),
            "cases_sim": sum(r.source == "sim" for r in rs), "detected_sim": sum(r.detected and r.source == "sim" for r in rs),
            "cases_real": sum(r.source == "real" for r in rs),
            "detected_real": sum(r.detected and r.source == "real" for r in rs),
            "other_codes": dict(sorted(others.items())),
            "missed": [r.name for r in rs if not r.detected][:10],
            "errors": [f"{r.name}: {r.error}" for r in rs if r.error][:5],
        })
    all_codes = sorted({faults.EXPECTED_CODE[k].value for k in faults.EXPECTED_CODE}
                       | {c for r in results for c in r.codes})
    codes = {}
    for code in all_codes:
        kinds = [k for k, c in faults.EXPECTED_CODE.items() if c.value == code]
        vis = [r for r in faulty if r.kind in kinds and r.visible]
        sub = [r for r in faulty if r.kind in kinds and not r.visible]
        fa = [r for r in clean if code in r.codes]
        lat = [ms for r in results for c, ms in r.latencies_ms if c == code]
        codes[code] = {
            "fault_kinds": kinds,
            "visible_cases": len(vis),
            "sensitivity_visible": (sum(r.detected for r in vis) / len(vis)) if vis else None,
            "subvisible_cases": len(sub),
            "sensitivity_subvisible": (sum(r.detected for r in sub) / len(sub)) if sub else None,
            "clean_cases": len(clean),
            "false_alerts": len(fa),
            "false_alert_rate": len(fa) / len(clean) if clean else None,
            "false_alert_cases": [r.name for r in fa][:10],
            "alerts": len(lat),
            "latency_p50_ms": _pct(lat, 50),
            "latency_p99_ms": _pct(lat, 99),
            "latency_max_ms": max(lat) if lat else None,
        }
    any_fa = [r for r in clean if r.codes]
    return {
        "cases": len(results),
        "clean_cases": len(clean),
        "clean_cases_real": sum(r.source == "real" for r in clean),
        "faulty_cases": len(faulty),
        "faulty_cases_visible": sum(r.visible for r in faulty),
        "clean_with_any_alert": len(any_fa),
        "clean_any_alert_rate": len(any_fa) / len(clean) if clean else None,
        "clean_real_alerts": {r.name: r.codes for r in clean if r.source == "real"},
        "errors": [f"{r.name}: {r.error}" for r in results if r.error][:20],
        "run_s_total": sum(r.run_s for r in results),
        "run_ms_p50": _pct([1e3 * r.run_s for r in results], 50),
        "rows": rows,
        "codes": codes,
    }


def check_targets(summary: dict[str, Any]) -> list[str]:
    """Every missed target, with the measured numbers ('' list: all met)."""
    misses = []
    for code, m in summary["codes"].items():
        if m["fault_kinds"] and m["visible_cases"]:
            if m["sensitivity_visible"] < TARGET_SENSITIVITY:
                bad = [f"{r['size']}: {r['detected']}/{r['cases']}" for r in summary["rows"]
                       if r["code"] == code and r["visible"] and r["sensitivity"] < 1.0]
                misses.append(f"{code}: sensitivity {m['sensitivity_visible']:.1%} < {TARGET_SENSITIVITY:.0%} "
                              f"on {m['visible_cases']} visible faults ({'; '.join(bad)})")
        if m["false_alert_rate"] is not None and m["false_alert_rate"] > TARGET_FALSE_ALERT_RATE:
            misses.append(f"{code}: false alerts {m['false_alerts']}/{m['clean_cases']} = {m['false_alert_rate']:.1%} "
                          f"> {TARGET_FALSE_ALERT_RATE:.0%} (e.g. {m['false_alert_cases'][:3]})")
        if m["latency_p99_ms"] is not None and m["latency_p99_ms"] > TARGET_LATENCY_P99_MS:
            misses.append(f"{code}: alert latency p99 {m['latency_p99_ms']:.1f} ms > {TARGET_LATENCY_P99_MS:.0f} ms")
    if summary["errors"]:
        misses.append(f"{len(summary['errors'])}+ cases failed to run: {summary['errors'][:3]}")
    return misses


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f} %" if pct else f"{v:.2f}"


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# QC evaluation: injected faults through the QC chain",
        "",
        "Generated by `bench/qc_eval.py` (numbers in `bench/results/qc_eval_cpu.json`); the test "
        "`tests/test_qc_evaluation.py` runs a smaller case set against the same targets.",
        "",
        f"Run: {meta['date']}, {meta['machine']}, config `{meta['config']}`, {summary['cases']} cases "
        f"({summary['clean_cases']} clean, of them {summary['clean_cases_real']} real; {summary['faulty_cases']} faulty, "
        f"{summary['faulty_cases_visible']} of clinically visible size), {meta['wall_s']:.0f} s.",
        "",
        "## Method",
        "",
        "* Clean scans: simulated brains (`inline.simulate.simulate_scan`: 64 x 64, 4-8 coils, 1-4 slices, "
        "axial / sagittal / coronal, T1w / T2w / PD, SNR 20-80, FOV 200-240 mm, 1-2 repetitions, one seed each) "
        "and the Cartesian real phantom files of `../shared/data` (not the EPI file: the QC chain has no EPI correction).",
        "* Faulty scans: the clean scans with one fault from `inline/qc/faults.py` each (simulated scans take the "
        "fault sizes in turn; real files get every size). Random channel, position, direction and motion time (30-70 % "
        "of the scan) per case, seeded.",
        "* Each case runs through `configs/qc.yaml` with `inline.offline.run_chain`.",
        "* Sensitivity: fraction of faulty cases of a kind raising the kind's alert code (other codes may come too). "
        "False-alert rate: fraction of clean cases raising that code. Latency: `detected_ns - revealed_ns` per alert. "
        "**The offline runner feeds readouts as fast as it can**, not at scanner pace: readouts queue behind each "
        "other, so these latencies bound the live ones from above for the same compute. Publish latency (detection "
        "to leaving the chain) is not measured: `RunResult.alerts` carries no sink arrival time. The live latency "
        "(scanner pace, real socket, to the bus) is in *Alert latency at scanner pace* below.",
        "",
        "Clinically visible sizes (the sensitivity target applies to these):",
        "",
    ]
    lines += [f"* `{k}`: {v}" for k, v in VISIBLE_DEFINITION.items()]
    lines += [
        "",
        f"Targets: sensitivity >= {TARGET_SENSITIVITY:.0%} (visible faults), false alerts <= "
        f"{TARGET_FALSE_ALERT_RATE:.0%} of clean cases per code, alert latency p99 <= {TARGET_LATENCY_P99_MS:.0f} ms.",
        "",
        "## Per alert code",
        "",
        "| code | visible faults | sensitivity | sub-visible faults | sensitivity | false alerts (clean) | alerts | latency p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for code, m in summary["codes"].items():
        lines.append(
            f"| `{code}` | {m['visible_cases']} | {_fmt(m['sensitivity_visible'], True)} | {m['subvisible_cases']} | "
            f"{_fmt(m['sensitivity_subvisible'], True)} | {m['false_alerts']}/{m['clean_cases']} = "
            f"{_fmt(m['false_alert_rate'], True)} | {m['alerts']} | {_fmt(m['latency_p50_ms'])} | "
            f"{_fmt(m['latency_p99_ms'])} | {_fmt(m['latency_max_ms'])} |"
        )
    lines += [
        "",
        f"Clean cases with any alert: {summary['clean_with_any_alert']}/{summary['clean_cases']} = "
        f"{_fmt(summary['clean_any_alert_rate'], True)}. Real clean files: "
        + ", ".join(f"`{n}`: {', '.join(c) or 'no alert'}" for n, c in summary["clean_real_alerts"].items())
        + ".",
        "",
        "## Per fault kind and size",
        "",
        "| fault | size | visible | expected code | detected | sensitivity | sim | real | other codes raised |",
        "|---|---|:-:|---|---:|---:|---:|---:|---|",
    ]
    for r in summary["rows"]:
        other = ", ".join(f"{c} x{n}" for c, n in r["other_codes"].items()) or "-"
        lines.append(
            f"| {r['kind']} | {r['size']} | {'yes' if r['visible'] else 'no'} | `{r['code']}` | {r['detected']}/{r['cases']} | "
            f"{_fmt(r['sensitivity'], True)} | {r['detected_sim']}/{r['cases_sim']} | {r['detected_real']}/{r['cases_real']} | {other} |"
        )
    misses = check_targets(summary)
    lines += ["", "## Targets", ""]
    lines += [f"* MISSED: {m}" + (" (offline, readouts fed as fast as possible: queueing; at scanner pace see "
                                  "below)" if "alert latency" in m else "") for m in misses] or ["* all met"]
    lines += [
        "",
        "Known misses (`KNOWN_SENSITIVITY_MISSES`; `tests/test_qc_evaluation.py` asserts every other target): "
        f"{', '.join(f'`{c}`' for c in KNOWN_SENSITIVITY_MISSES)}.",
        "",
        "* `motion`: between repetitions 100 % (ReadoutQC: translation from the phase ramp of the cross-power of "
        "the central k-space block >= 1 mm, or the per-line residual after the ramp in excess of the noise "
        "expectation > 0.001; ShotMotionQC, now in the standard chains, names the shot). Mid-scan motion within one "
        "repetition is found less often; see *Mid-scan motion* below.",
        "* `ghosting`: meets the target (0.6 rad: the ghost (31 %) entered the 0.15 object mask and left no "
        "background to fit it; a second fit on a stricter mask, 0.4 of the bright object, counted from a ratio of "
        "0.12, for scans without ky acceleration). The Skyra R=3 file at 0.3 rad (measured 0.118) used to be lost: "
        "for accelerated scans the 0.15 mask is the only fit, and the strict fit's 0.12 floor was applied to it "
        "(fixed; `tests/gadgets/test_qc_image.py` has both cases). The misses left are the real 32-channel phantom "
        "(it fills the field of view along phase encoding: the ghost lands on the object, there is no background to "
        "fit) and one simulated sagittal PD slice at 0.6 rad (the ghost overlaps the object, halving its mask; the "
        "PE-band check reports `motion` instead). The test's subset has 4 real of 11 cases per size, so the code "
        "stays listed.",
        "* `rf_spike` (configs/qc.yaml: 3.2 x both the kx running median and the neighbouring line, 5 x the median "
        "edge magnitude as noise floor): 98 % here; the test's subset has fewer cases (~94 %): single spikes on the "
        "echo peak, where the neighbouring line is as large as the spike, are missed (also the one 0.5 x miss here).",
        "* `low_snr` / `coil_noise`: the misses are the real files without a noise scan. `low_snr` stays an "
        "absolute-quality alert (SNR < 10 warning, < 5 critical; an image with no object distinguishable from noise "
        "counts as SNR 0); the 32-channel phantom's measured SNR (~13) is not noise-limited (a structured background: "
        "raised thermal noise hardly changes it), so its SNR-8 and SNR-5 cases stay above 10. A relative check "
        "(image background noise vs the noise scan's prediction, >= 1.5x) needs a noise scan these files lack, and "
        "the imaging high-kx levels of the simulated scans carry signal up to 3x the noise, too much for a 1.5x margin "
        "without one. `coil_noise`: with a noise scan, each channel's std over the median of the *other* channels "
        "above exp(3 x robust spread (1.4826 MAD of their log std)), clipped to [1.75, 3]; in imaging, per-channel "
        "robust high-kx noise (median |x|^2 / ln 2 per line, 20th percentile over lines) against the noise scan, or "
        "without one against the other channels (4 robust spreads, no upper clip; two channels: 2.5x the other). "
        "Without a noise scan a real array's natural spread (0.5-5.5x on the 32-channel file, 16-channel file up to "
        "~3x) hides a 3-4x channel: lowering the threshold to catch it flags healthy channels of the same files.",
    ]
    lines += _midscan_section()
    lines += _paced_latency_section()
    lines += _cpu_section()
    if summary["errors"]:
        lines += ["", "Cases that failed to run:", ""] + [f"* {e}" for e in summary["errors"]]
    return "\n".join(lines) + "\n"


def _midscan_section() -> list[str]:
    return [
        "",
        "## Mid-scan motion (one repetition)",
        "",
        "* **The injector** (`faults.rigid_motion`) moves each coil's image with the object (a phase ramp on every "
        "channel's k-space, rotation of the coil images): physically the object moves inside fixed receive coils. "
        "For 2-5 mm and 2-5 deg with smooth coil maps the two differ little, and both leave the k-space of either "
        "side of the motion coil-consistent (the same GRAPPA kernel fits both sides): detectors built on coil "
        "redundancy see only the few lines whose neighbours straddle the motion. The simulated scans keep the injector "
        "as it is (RawScan carries no coil maps to re-synthesise with); this note stands instead.",
        "* **Visibility** (image artefact, 64 x 64, motion at 30-70 % of a sequential ky order, 16 calibration bases "
        "(`sim_variant(7000 + j)`, simulator seeds 50000+: not the evaluation's 1000-1399)): NRMSE of the corrupted vs the motion-free image of either pose within "
        "the object, worst slice, median (10th percentile): 1 mm 5.9 % (1.9 %), 2 mm 9.0 % (3.5 %), 5 mm 16.3 % "
        "(8.2 %), 1 deg 2.6 % (1.7 %), 2 deg 6.1 % (1.4 %), 5 deg 9.0 % (5.5 %). The noise of these scans is 1.3-5 % "
        "of the object: a part of the 2 mm / 2 deg cases (motion near the k-space centre line, where few lines lie "
        "on the far side of their mirror partner) leave an artefact at or below the noise. No artefact-based "
        "visibility definition was adopted: even at >= 5 mm / 5 deg the detectors below miss too much.",
        "* **Detectors** (calibration set `sim_variant(7000 + j)`, simulator seeds 50000+; scores per case):",
        "  * line prediction from ky neighbours across coils in the central band, error against the local error "
        "(`kspace_consistency`, kept): clean up to 5.5, 2 mm median 2.5, 5 mm median 3.5 (12 bases): at the noise;",
        "  * **the same prediction over every line outside +-5 lines of the centre, error against the noise** "
        "(`kspace_consistency_noise`, `inline/motion/consistency.py`, added): per target line the residual energy "
        "over what white noise leaves (unit from the outermost eighth of the lines), in noise standard deviations "
        "above the lines 2-6 away; a moment scores the smaller of its two straddling lines minus the larger of "
        "the two lines beyond (one spiked line raises three). 192 clean bases: max 7.7 (threshold 10); above it "
        "37 % of 2 mm, 66 % of 5 mm, 20 % of 2 deg, 40 % of 5 deg (the earlier relative version, all lines: clean "
        "max 14.9). Measured against the signal instead of the noise, the error of the outer lines was at the "
        "noise (relative error ~1.3): that is why the central-band check saw so little. Near the centre the "
        "kernel's own model error (chi ~ 50 next to the peak) hides the jump, and small motions leave errors "
        "within the noise of a 64 x 64, SNR 20-80 scan; a 2-channel real phantom scored 21.6 clean (too little "
        "coil redundancy), so the check needs >= 4 channels;",
        "  * Hermitian (conjugate-symmetry) consistency after low-resolution phase correction, with a step at the "
        "time boundary in the per-|ky| excess of 1 - Re(corr(k, -k)): 2 mm 29/30 above the clean bulk, but clean "
        "axial FOV-200 scans (fold-over: non-smooth phase) reach 0.33 and the real 16-channel and Skyra phantoms "
        "0.65 / 0.87 (their phase is not smooth), above most motion cases;",
        "  * autofocus by linearised rigid motion of the lines after each candidate boundary (dx, dy, rotation "
        "regressors), background energy explained over the noise: 2 mm median 50, clean bulk < 5, but clean "
        "coronal/sagittal T2w slices with dim neck tissue outside the mask reach 11-50 (PE band only: 140); "
        "cross-validating the fit between image halves removes those (clean < 1.3) and with them most motion cases "
        "(5 mm median 0.5-3).",
        "  None reaches 95 % at <= 2 % false alerts; the `motion` code stays listed.",
    ]


def _paced_latency_section(path: Path = REPO / "bench" / "results" / "qc_latency_cpu.json") -> list[str]:
    if not path.exists():
        return ["", "## Alert latency at scanner pace", "", f"(no `{path.name}`: run `bench/qc_latency.py`)"]
    d = json.loads(path.read_text())
    lines = [
        "",
        "## Alert latency at scanner pace",
        "",
        f"`bench/qc_latency.py` ({d['date']} UTC, `bench/results/{path.name}`): {d['case']}; what a tap finds goes "
        "straight to the session, not through the chain's queues. Per code, cases are "
        "streamed until 20 raised it. Latency: arrival of the revealing readout at the server to publication on "
        "the ZeroMQ bus (the bus record's `latency_ms`). `motion`: the cases found are mostly two-repetition "
        "scans (ReadoutQC's repetition check, ShotMotionQC); mid-scan motion in one repetition is rarely found "
        "(above). With the taps in the worker but their findings still queued behind the data (2026-11-22), one "
        "`coil_noise` case of 21 took 108 ms (p99 89 ms); the first run with findings handed straight to the "
        "session had no such tail (every code max <= 14.1 ms; one run each, so this is consistent with queueing "
        "as the cause, not proof of it).",
        "",
        "| code | cases streamed | cases with the alert | alerts | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for code, m in sorted(d["per_code"].items()):
        lines.append(f"| `{code}` | {m['cases_streamed']} | {m['cases_detected']} | {m['n']} | "
                     f"{_fmt(m.get('p50'))} | {_fmt(m.get('p99'))} | {_fmt(m.get('max'))} |")
    return lines


#: ``bench/qc_overhead.py`` variants: JSON key and row label.
_OVERHEAD_VARIANTS = (
    ("latency_ms_with_qc", "in a worker process (`inline serve`'s default, `--qc-workers 1`)"),
    ("latency_ms_with_qc_on_threads", "on threads of the server (`--qc-workers 0`)"),
    ("latency_ms_without_qc", "none (chain without `readout_qc`, `shot_motion`, `image_qc`)"),
)


def _cpu_section(path: Path = REPO / "bench" / "results" / "qc_overhead_cpu.json") -> list[str]:
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    cpu = d.get("qc_tap_cpu_per_slice") or {}
    lines = [
        "",
        "## QC cost (32 channels, 256 x 256, 512 readout samples, 10 slices)",
        "",
        f"`bench/qc_overhead.py` ({d['date']} UTC, `bench/results/{path.name}`). CPU per slice of each tap run "
        "alone (thread time, slice-end work included; the least disturbed of 3 passes):",
        "",
        "| tap | CPU ms per slice | largest call ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{k}` | {v['ms_per_slice']:.1f} | {v['max_call_ms']:.1f} |" for k, v in cpu.items()]
    load = d.get("load_average_1_5_15_min_at_end")
    lines += [
        "",
        "`readout_qc`'s cost is spread over the readouts (about 0.08 ms each); its slice-end work (the mid-scan "
        "motion checks) is about 16 ms per slice: 6 ms for the central band, 10 ms for the check over every line "
        "(`inline/motion/consistency.py`: 256 lines x 32 channels x 64 samples, compressed to 8 virtual coils; "
        "4.4 ms for 64 lines x 8 channels x 128 samples), which raised the slice from 23.9 to 35.0 ms. On threads "
        "this heavier slice end holds the interpreter lock longer: the thread variant below went from p50 10.1 / "
        "p99 18.2 ms (previous run) to 28.9 / 53.6 ms, while the worker stays near the no-QC level (p99 22.7 against 18.9 "
        "in the same run), as `inline serve` runs it. `image_qc` was 7.3 ms per slice before its hole filling (one "
        "labelling of the background instead of SciPy's iterated erosions) and its 3 x 3 opening (array shifts "
        "instead of SciPy's 1-D filters) were replaced; both are tested equal to SciPy's.",
        "",
        "Image latency after the last readout, default chain, scanner pace, 3 scans per variant, the variants "
        f"interleaved (load average at the end {load[0] if load else 'not recorded'}):",
        "",
        "| QC taps | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in _OVERHEAD_VARIANTS:
        if key in d:
            v = d[key]
            lines.append(f"| {label} | {v['p50']:.1f} | {v['p95']:.1f} | {v['p99']:.1f} | {v['max']:.1f} |")
    lines += [
        "",
        "With the taps in a worker process (`inline/tap_process.py`, nice 19) the images come as fast as without "
        "QC. On threads, the taps hold the interpreter lock while a check runs Python code, and the "
        "reconstruction waits for it between kernels even though their threads are niced. The run before the "
        "ImageQC speed-up (2026-11-22 02:36) showed this more clearly: in a worker p50 7.4, p99 17.1 ms; on "
        "threads p50 21.9, p99 64.1 ms; without QC p50 8.4, p99 11.3 ms. The client runs in the bench's process "
        "here. `inline bench` runs the server in its own process and gives the same picture. With QC in a worker, "
        "three short runs gave p50 8.6-10.2 ms and p99 20-23 ms. With the taps on threads, two runs before the "
        "change gave p50 16.0-21.7 ms and p99 31.8-34.4 ms.",
        "",
        "Before this revision (same bench): ReadoutQC ~483 ms CPU per slice (0.57 ms per readout in the server, "
        "the slice-end mid-scan check up to ~1 s: a least-squares kernel over 32 channels x 129 samples), ImageQC "
        "~20 ms per 256 x 256 image. Now: the mid-scan check compresses the channels to 8 virtual coils (SVD of the "
        "centre lines) and 33 samples and is vectorised; per readout one magnitude pass, medians by one partition, "
        "the kx running median only at spike candidates, the coil-noise estimate on at most ~32 samples per channel "
        "and every other outer line of readouts over 256 samples; ImageQC's masks share their statistics and use "
        "shift-based morphology (equal to SciPy's, tested). Thread CPU varies with the machine's load: five runs "
        "of this revision on 2026-11-21/22 gave ReadoutQC 24-27.5 ms and ImageQC 7.5-10.4 ms per slice.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", type=int, default=400, help="simulated clean scans")
    ap.add_argument("--faults-per-base", type=int, default=2)
    ap.add_argument("--config", default="qc")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "qc_eval_cpu.json")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "qc_evaluation.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = evaluate(args.config, args.bases, args.faults_per_base, not args.no_real, args.seed,
                       log=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - t0
    summary = summarise(results)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
        "config": str(args.config), "bases": args.bases, "faults_per_base": args.faults_per_base, "seed": args.seed,
        "wall_s": wall,
        "latency_note": "detected_ns - revealed_ns; offline runner feeds readouts as fast as possible (not scanner "
                        "pace); publish latency not exposed by RunResult",
        "targets": {"sensitivity": TARGET_SENSITIVITY, "false_alert_rate": TARGET_FALSE_ALERT_RATE,
                    "latency_p99_ms": TARGET_LATENCY_P99_MS},
        "visible_definition": VISIBLE_DEFINITION,
    }
    misses = check_targets(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "targets_missed": misses,
                                    "cases": [asdict(r) for r in results]}, indent=1))
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
