"""The results of a case: ``DIR/NAME.json``, three PNG plots beside it, and a text table.

Plots (matplotlib, Agg):

* ``NAME_latency_cdf.png``: cumulative distribution of image latency after the last
  readout, ours at each concurrency level and each peer's per-slice time, log x axis;
* ``NAME_per_gadget.png``: time per image spent in each stage (by message kind), one session;
* ``NAME_concurrency.png``: latency p50/p95/p99 against concurrent sessions, with the floor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def write(doc: dict, out_dir: Path) -> list[Path]:
    """Write ``out_dir/<case>.json`` and, for a case that ran, its plots; returns the paths."""
    doc = _clean(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{doc['case']}.json"
    path.write_text(json.dumps(doc, indent=2, allow_nan=False, default=_json_default) + "\n")
    written = [path]
    if "skipped" not in doc:
        written += plot(doc, out_dir)
    return written


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(value):
    """NaN/inf -> None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def plot(doc: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = doc["case"]
    paths = []

    # latency CDF
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lv in doc.get("concurrency", []):
        _ecdf(ax, lv["latencies_ms"], f"inline, {lv['sessions']} session{'s' if lv['sessions'] > 1 else ''}", lw=2)
    for peer, p in doc.get("peers", {}).items():
        if p.get("times_ms"):
            _ecdf(ax, p["times_ms"], f"{peer} (per {'image' if peer == 'gadgetron_python' else 'slice'})", ls="--")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency after last readout [ms] (peers: per-slice time)")
    ax.set_ylabel("fraction of images")
    ax.set_title(f"{name}: image latency ({doc['run']['pace']} pace)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    paths.append(_save(fig, out_dir / f"{name}_latency_cdf.png"))

    # per-gadget breakdown
    rows = significant_stages(doc)
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(rows), 3) + 1.5))
    labels = [f"{r['stage']} [{r['kind']}]" for r in rows]
    values = [r["ms_per_image"] for r in rows]
    y = np.arange(len(rows))[::-1]
    ax.barh(y, values, color="tab:blue")
    for yi, r in zip(y, rows):
        mean = r["ms_per_image"] / r["calls_per_image"] if r["calls_per_image"] else float("nan")
        ax.text(r["ms_per_image"], yi, f"  {r['calls_per_image']:.0f} calls, p50 {r['p50_ms']:.3g} / mean {mean:.3g} ms", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("time per image [ms] (one session; calls per image, per-call p50 / mean)")
    ax.set_title(f"{name}: where the time goes", fontsize=10)
    if values:
        ax.set_xlim(0, max(values) * 1.9)
    paths.append(_save(fig, out_dir / f"{name}_per_gadget.png"))

    # latency vs concurrent sessions
    fig, ax = plt.subplots(figsize=(6, 4))
    levels = doc.get("concurrency", [])
    n = [lv["sessions"] for lv in levels]
    for key, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        ax.plot(n, [lv["latency_ms"][key] for lv in levels], style, label=f"inline {key}")
    floor = doc.get("peers", {}).get("scipy_fft_rss", {}).get("latency_ms", {}).get("p50")
    if floor:
        ax.axhline(floor, color="grey", ls="--", label="scipy FFT+RSS floor p50")
    ax.set_xticks(n)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("latency after last readout [ms]")
    ax.set_title(f"{name}: latency vs concurrent sessions ({doc.get('machine', {}).get('cpu_count', '?')} cores)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / f"{name}_concurrency.png"))
    return paths


def significant_stages(doc: dict) -> list[dict]:
    """Per-gadget rows worth showing: every message kind, and ``close`` calls that took time."""
    rows = [r for r in doc.get("per_gadget", {}).get("stages", []) if r.get("ms_per_image") is not None]
    total = sum(r["ms_per_image"] for r in rows) or 1.0
    return [r for r in rows if r["kind"] != "close" or r["ms_per_image"] > 0.01 * total]


def _ecdf(ax, values, label, **kw) -> None:
    v = np.sort(np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float))
    if v.size:
        ax.step(np.r_[v[0], v], np.r_[0.0, np.arange(1, v.size + 1) / v.size], where="post", label=label, **kw)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(doc: dict) -> list[list[str]]:
    """Rows ``[who, p50, p99, max, ingest acq/s, ratio p50, ratio p99, ratio ingest]`` of a case."""
    if "skipped" in doc:
        return [["inline", "skipped: " + doc["skipped"], "", "", "", "", "", ""]]
    lat = doc["latency_ms"]
    rows = [["inline", _f(lat["p50"]), _f(lat["p99"]), _f(lat["max"]), _f(doc.get("ingest_acq_per_s"), "{:.0f}"), "1", "1", "1"]]
    for name, p in doc.get("peers", {}).items():
        if name == "inline_reader":
            continue
        q = doc["ratios"].get(name, {})
        if "skipped" in p:
            rows.append([name, "skipped: " + p["skipped"][:80], "", "", "", "", "", ""])
        elif "latency_ms" in p:
            l = p["latency_ms"]
            rows.append([name, _f(l["p50"]), _f(l["p99"]), _f(l["max"]), "", _f(q.get("latency_p50")), _f(q.get("latency_p99")), ""])
        else:
            rows.append([name, "", "", "", _f(p["ingest_acq_per_s"], "{:.0f}"), "", "", _f(q.get("ingest"))])
    return rows


def summary_markdown(out_dir: Path) -> Path:
    """``out_dir/SUMMARY.md``: the table of every ``inline bench`` result in ``out_dir``."""
    docs = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("benchmark") == "inline bench":
            docs.append(doc)
    lines = [
        "# inline bench results",
        "",
        "Image latency after the last readout [ms] (peers: time per slice, or per volume in 3D), ingest",
        "[acquisitions/s]; ratios are ours / peer (latency: < 1 means we are faster; ingest: > 1 means we are",
        "faster). Written by `inline bench`; the numbers behind each row are in `<case>.json`.",
        "",
    ]
    head = ["who", "p50", "p99", "max", "ingest acq/s", "ratio p50", "ratio p99", "ratio ingest"]
    for doc in docs:
        run = doc.get("run", {})
        when = doc.get("machine", {}).get("date_utc", "")
        lines += [f"## {doc['case']}", "", doc.get("description", ""), ""]
        if "skipped" not in doc:
            lines += [f"config `{doc['config']}`, {run.get('pace')} pace, sessions {run.get('sessions')}, backend {doc.get('backend')}, {when}", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table(doc)]
        for name, t in doc.get("targets", {}).items():
            met = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
            lines.append(f"- target {name}: {_f(t['value'], '{:.3g}')} {met}")
        lines.append("")
    path = out_dir / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    return path
