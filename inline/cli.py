"""Command line: ``inline serve | send | run | bench | demo | gadgets | configs | simulate``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Scanner-inline MR reconstruction runtime (ISMRMRD/MRD streaming).")
console = Console(stderr=False)


def _logging(level: str) -> None:
    """Logging format; allocator and BLAS threads tuned for latency (:mod:`inline.allocator`)."""
    from inline.allocator import tune_process

    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    tune_process()


def _parse_params(items: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs; VALUE is read as JSON when it parses (numbers, true/false), else a string."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(9002, help="TCP port"),
    journal_dir: Optional[Path] = typer.Option(None, help="journal every received stream here (ISMRMRD .h5 + .mrd)"),
    config_dir: list[Path] = typer.Option([], help="extra directory of chain configs (repeatable)"),
    max_message_mb: float = typer.Option(512.0, help="largest accepted message [MiB]"),
    queue_size: int = typer.Option(64, help="bound of each inter-gadget queue [messages]"),
    bus: str = typer.Option("tcp://127.0.0.1:5557", help="ZeroMQ endpoint of the QC alert bus ('' turns it off)"),
    alert_log_dir: Optional[Path] = typer.Option(None, help="JSONL alert logs (default: the journal directory, else ./alerts)"),
    dashboard_port: int = typer.Option(8080, help="port of the radiographer dashboard on the host (-1 turns it off)"),
    preload: list[str] = typer.Option(
        [], "--preload", help="chain config whose models are loaded and warmed up at start (repeatable; default: every config with a warm-up hook)"
    ),
    no_warmup: bool = typer.Option(False, "--no-warmup", help="load no model at start (the first scan of a DL chain loads it)"),
    metrics_port: int = typer.Option(9102, help="Prometheus metrics on http://127.0.0.1:PORT/metrics (-1 turns it off)"),
    trace_dir: Optional[Path] = typer.Option(None, help="write each session's per-message spans here (<session>.trace.json, <session>.chrome.json)"),
    qc_workers: int = typer.Option(
        1, help="worker processes for the QC taps, so their checks never hold the server's interpreter lock (0: taps on threads of the server)"
    ),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve MRD streaming connections: one chain per connection, QC alerts on the bus."""
    from inline.server import PRELOAD_ALL
    from inline.server import serve as run_server
    from inline.session import SessionSettings

    _logging(log_level)
    settings = SessionSettings(
        config_dirs=list(config_dir),
        journal_dir=journal_dir,
        max_message_bytes=int(max_message_mb * 2**20),
        queue_size=queue_size,
        alert_log_dir=alert_log_dir or (None if journal_dir else Path("alerts")),
        trace_dir=trace_dir,
    )
    run_server(
        host,
        port,
        settings,
        bus_endpoint=bus or None,
        dashboard_port=None if dashboard_port < 0 else dashboard_port,
        preload=None if no_warmup else (list(preload) or PRELOAD_ALL),
        metrics_port=None if metrics_port < 0 else metrics_port,
        tap_workers=qc_workers,
    )


@app.command()
def send(
    file: Path = typer.Argument(..., exists=True, help="ISMRMRD .h5 (or .mrd stream) to send"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(9002),
    config: str = typer.Option("default", help="config name sent as CONFIG_FILE"),
    config_file: Optional[Path] = typer.Option(None, exists=True, help="chain YAML sent inline as CONFIG_TEXT"),
    param: list[str] = typer.Option([], "--param", "-p", help="session parameter KEY=VALUE (sent as JSON TEXT)"),
    pace: str = typer.Option("fast", help="fast | realtime (from acquisition time stamps)"),
    tick_ms: float = typer.Option(2.5, help="duration of one time-stamp tick [ms]"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="write returned images to this .h5"),
    previews: Optional[Path] = typer.Option(None, help="write PNG previews to this directory"),
    log_level: str = typer.Option("warning"),
) -> None:
    """Stream a raw-data file to a server; save the images; exit non-zero on an ERROR text."""
    from inline.client import send_scan
    from inline.imagefile import write_images
    from inline.mrdfile import read_scan

    _logging(log_level)
    scan = read_scan(file)
    result = send_scan(
        scan,
        host,
        port,
        config_name=None if config_file else config,
        config_text=config_file.read_text() if config_file else None,
        parameters=_parse_params(param),
        pace=pace,
        tick_s=tick_ms / 1e3,
    )
    for t in result.texts:
        console.print(t, markup=False, highlight=False)
    write_images(result.images, out, previews)
    console.print(f"{len(result.images)} images received" + (f", written to {out}" if out else ""))
    if result.errors or not result.closed:
        raise typer.Exit(1)


@app.command()
def run(
    config: str = typer.Argument(..., help="config name or path to a chain YAML"),
    file: Path = typer.Argument(..., exists=True, help="ISMRMRD .h5 or .mrd journal"),
    out: Path = typer.Option(..., "-o", "--out", help="output images .h5"),
    param: list[str] = typer.Option([], "--param", "-p", help="gadget parameter KEY=VALUE"),
    previews: Optional[Path] = typer.Option(None, help="write PNG previews to this directory"),
    trace: Optional[Path] = typer.Option(None, help="write per-message spans of every gadget call to this file"),
    trace_format: str = typer.Option("json", help="json | chrome (Trace Event Format: chrome://tracing, Perfetto)"),
    log_level: str = typer.Option("warning"),
) -> None:
    """Run a chain in-process on a file (no sockets); replays journals."""
    from inline.config import ConfigError, load_chain
    from inline.engine import GadgetError
    from inline.imagefile import write_images
    from inline.mrdfile import read_scan
    from inline.offline import run_chain

    from inline.spans import FORMATS, SpanRecorder

    if trace_format not in FORMATS:
        raise typer.BadParameter(f"--trace-format must be one of {', '.join(FORMATS)}, got {trace_format!r}")
    _logging(log_level)
    spans = SpanRecorder(file.stem) if trace else None
    try:
        result = run_chain(load_chain(config), read_scan(file), _parse_params(param), spans=spans)
    except (ConfigError, GadgetError) as e:
        console.print(f"[red]ERROR[/] {e}")
        raise typer.Exit(1)
    write_images(result.images, out, previews)
    for t in result.texts:
        console.print(t, markup=False, highlight=False)
    console.print(f"{len(result.images)} images written to {out}")
    if result.summary:
        console.print(result.summary.format(), markup=False, highlight=False)
    if spans is not None:
        console.print(f"{len(spans)} spans written to {spans.write(trace, trace_format)} ({trace_format})")


@app.command()
def bench(
    case: list[str] = typer.Option(["all"], "--case", help="case name (repeatable; 'all': the standard cases; --list shows them)"),
    out: Path = typer.Option(Path("bench/results"), "--out", help="results directory: NAME.json and PNG plots"),
    pace: Optional[str] = typer.Option(None, help="realtime (time stamps) | fast; default: the case's"),
    sessions: Optional[str] = typer.Option(None, help="concurrent session counts, e.g. 1,2,4; default: the case's"),
    repeats: Optional[int] = typer.Option(None, help="measured rounds per session count; default: the case's"),
    warmup: Optional[int] = typer.Option(None, help="excluded warm-up rounds; default: the case's"),
    config: Optional[str] = typer.Option(None, help="run the case's scan through this chain config instead (e.g. default_gpu)"),
    config_file: Optional[Path] = typer.Option(None, exists=True, help="... or through this chain YAML, sent as CONFIG_TEXT (ablations)"),
    peers: str = typer.Option("scipy,bart,gadgetron,ingest", help="peers to run (comma separated; '' for none)"),
    ingest_repeats: int = typer.Option(3, help="runs of each ingest receiver"),
    tick_ms: float = typer.Option(2.5, help="duration of one time-stamp tick, in ms"),
    stagger_s: float = typer.Option(0.0, help="start concurrent session i this many seconds x i after the first (0: together, the worst case)"),
    list_: bool = typer.Option(False, "--list", help="list the cases and exit"),
    log_level: str = typer.Option("warning"),
) -> None:
    """Benchmark: replay scans through a real socket to a server process, with peers on the same data."""
    from inline.benchmark.command import UnknownCase, case_names, list_cases
    from inline.benchmark.command import run as run_bench
    from inline.benchmark.suite import PEERS, BenchOptions

    _logging(log_level)
    if list_:
        list_cases(console)
        return
    chosen = tuple(p for p in peers.split(",") if p)
    if unknown := [p for p in chosen if p not in PEERS]:
        raise typer.BadParameter(f"unknown peers {unknown} (known: {', '.join(PEERS)})")
    if pace not in (None, "fast", "realtime"):
        raise typer.BadParameter(f"--pace must be realtime or fast, got {pace!r}")
    try:
        names = case_names(case)
        levels = tuple(int(n) for n in sessions.split(",")) if sessions else None
    except (UnknownCase, ValueError) as e:
        raise typer.BadParameter(str(e))
    opts = BenchOptions(
        pace=pace, sessions=levels, repeats=repeats, warmup=warmup, config=config, config_file=config_file, tick_ms=tick_ms,
        peers=chosen, ingest_repeats=ingest_repeats, stagger_s=stagger_s,
    )
    run_bench(names, out, opts, console)


@app.command()
def demo(
    file: Optional[Path] = typer.Argument(None, exists=True, help="stream this file instead of a simulated scan"),
    out: Path = typer.Option(Path("demo-out"), "--out", help="output directory"),
    config: str = typer.Option("default"),
    pace: str = typer.Option("realtime", help="realtime | fast"),
    slices: int = typer.Option(10),
    coils: int = typer.Option(32),
    matrix: int = typer.Option(256),
    log_level: str = typer.Option("warning"),
) -> None:
    """Server + client in one process: stream a scan at scanner pace, show image latencies."""
    from inline.demo import run_demo

    _logging(log_level)
    raise typer.Exit(run_demo(file, out, config=config, pace=pace, slices=slices, coils=coils, matrix=matrix, console=console))


def _type_name(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


@app.command()
def gadgets() -> None:
    """List the gadget library with accepted/emitted types and parameters."""
    from inline.registry import all_gadgets

    for name, cls in all_gadgets().items():
        kind = next((b.__name__ for b in cls.__mro__[1:] if b.__name__ in ("PureGadget", "AccumulatingGadget")), "Gadget")
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        t = Table(title=escape(f"{name} [{kind}]: {doc}"), title_justify="left", show_edge=False)
        t.caption = f"accepts {', '.join(c.__name__ for c in cls.accepts)} -> emits {', '.join(c.__name__ for c in cls.emits)}"
        for col in ("parameter", "type", "default", "description"):
            t.add_column(col)
        for pname, f in cls.Params.model_fields.items():
            t.add_row(f.alias or pname, escape(_type_name(f.annotation)), escape(repr(f.default)), escape(f.description or ""))
        console.print(t)


@app.command("console")
def console_view(bus: str = typer.Option("tcp://127.0.0.1:5557", help="alert bus to subscribe to")) -> None:
    """Live terminal view for the radiographer: sessions, image latencies, alerts (a / a N to acknowledge, q to quit)."""
    from inline.console import run_console

    raise typer.Exit(run_console(bus))


@app.command("dashboard")
def dashboard_view(
    bus: str = typer.Option("tcp://127.0.0.1:5557", help="alert bus to subscribe to"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8080),
) -> None:
    """Serve the radiographer dashboard for a running server's bus (``inline serve`` starts one itself)."""
    from inline.dashboard import DashboardServer

    DashboardServer(bus, host, port).serve_forever()


@app.command()
def configs() -> None:
    """List chain configs and their gadgets."""
    from inline.config import available_configs, load_chain

    for name in available_configs():
        spec = load_chain(name)
        console.print(f"[bold]{name}[/]: {spec.description}\n  " + " -> ".join(f"{g.name}({g.class_})" for g in spec.gadgets))


@app.command()
def simulate(
    out: Path = typer.Argument(..., help="output ISMRMRD .h5"),
    matrix: int = typer.Option(256),
    slices: int = typer.Option(10),
    coils: int = typer.Option(32),
    acceleration: int = typer.Option(1),
    acs_lines: int = typer.Option(24),
    repetitions: int = typer.Option(1),
    contrast: str = typer.Option("t1w"),
    seed: int = typer.Option(0),
) -> None:
    """Write a simulated multi-coil scan (MNI152 anatomy) as ISMRMRD .h5."""
    from inline.mrdfile import RawScan, write_scan_file
    from inline.simulate import simulate_scan

    sim = simulate_scan(matrix=matrix, slices=slices, coils=coils, acceleration=acceleration, acs_lines=acs_lines, repetitions=repetitions, contrast=contrast, seed=seed)
    write_scan_file(out, RawScan(sim.header_xml, list(sim.acquisitions)))
    console.print(f"wrote {out}: {len(sim.acquisitions)} acquisitions")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
