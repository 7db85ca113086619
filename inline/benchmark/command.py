"""``inline bench``: run cases with a progress bar, write their results, print the tables."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from inline.benchmark import report
from inline.benchmark.cases import CASES, STANDARD
from inline.benchmark.suite import BenchOptions, planned_steps, run_case


class UnknownCase(ValueError):
    pass


def case_names(names: list[str]) -> list[str]:
    """Expand ``all`` to the standard cases; check every name."""
    out: list[str] = []
    for n in names:
        for m in STANDARD if n == "all" else [n]:
            if m not in CASES:
                raise UnknownCase(f"unknown case {m!r} (known: {', '.join(CASES)}, all)")
            if m not in out:
                out.append(m)
    return out


def list_cases(console: Console) -> None:
    t = Table(title="benchmark cases", title_justify="left")
    for col in ("case", "config", "pace", "sessions", "status", "description"):
        t.add_column(col)
    for c in CASES.values():
        reason = c.unavailable()
        t.add_row(c.name, c.config, c.pace, ",".join(map(str, c.sessions)), "ready" if reason is None else f"skipped: {reason}", c.description)
    console.print(t)


def run(names: list[str], out_dir: Path, opts: BenchOptions, console: Console) -> list[dict]:
    """Run the cases in order; write each one's JSON and plots as soon as it ends."""
    docs = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as progress:
        for name in names:
            case = CASES[name]
            task = progress.add_task(name, total=planned_steps(case, opts))

            def step(description: str, advance: float, task=task) -> None:
                progress.update(task, description=description, advance=advance)

            doc = run_case(case, opts, step)
            progress.update(task, completed=progress.tasks[task].total, description=f"{name}: {'skipped' if 'skipped' in doc else 'done'}")
            paths = report.write(doc, out_dir)
            progress.console.print(f"wrote {', '.join(str(p) for p in paths)}")
            docs.append(doc)
    for doc in docs:
        print_case(doc, console)
    console.print(f"wrote {report.summary_markdown(out_dir)}")
    return docs


def print_case(doc: dict, console: Console) -> None:
    t = Table(title=escape(f"{doc['case']}: latency after last readout [ms] and ingest; ratios = ours / peer"), title_justify="left")
    for col in ("who", "p50", "p99", "max", "ingest acq/s", "ratio p50", "ratio p99", "ratio ingest"):
        t.add_column(col, justify="right" if col != "who" else "left")
    for row in report.table(doc):
        t.add_row(*(escape(c) for c in row))
    console.print(t)
    if "skipped" in doc:
        return
    g = Table(title=f"{doc['case']}: where the time goes (one session)", title_justify="left")
    for col in ("stage", "kind", "calls/image", "p50 ms", "mean ms", "p99 ms", "ms/image"):
        g.add_column(col, justify="left" if col in ("stage", "kind") else "right")
    for r in report.significant_stages(doc):
        g.add_row(f"{r['stage']} ({r['gadget']})", r["kind"], report._f(r["calls_per_image"], "{:.1f}"), report._f(r["p50_ms"], "{:.3f}"),
                  report._f(r["mean_ms"], "{:.3f}"), report._f(r["p99_ms"], "{:.3f}"), report._f(r["ms_per_image"], "{:.2f}"))  # fmt: skip
    console.print(g)
    s = doc["server"]
    console.print(
        f"server CPU {s['cpu_s']:.1f} s ({report._f(s['cpu_ms_per_image'], '{:.1f}')} ms/image), peak RSS {s['peak_rss_mib']:.0f} MiB, "
        f"backend {doc['backend']}, acquisitions received {s['acquisitions_received']:.0f}/{s['acquisitions_sent']}"
    )
    for note in doc.get("server_notes", []):
        if not note.startswith("INFO"):
            console.print(f"  server said: {note}", markup=False, highlight=False)
    for name, t_ in doc.get("targets", {}).items():
        met = {True: "[green]met[/]", False: "[red]not met[/]", None: "n/a"}[t_["met"]]
        console.print(f"  target {name}: {report._f(t_['value'], '{:.3g}')} {met}")
