"""``inline demo``: the main job end to end on one machine.

Starts a server in-process on a free port, streams a scan at scanner pace through a real
socket, shows a live table of returned images with their latencies, and writes the images
(ISMRMRD .h5) and PNG previews. With no file it streams a multi-slice, 32-coil scan made
by :mod:`inline.simulate` from the MNI152 template.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ismrmrd
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from inline.client import send_scan
from inline.imagefile import write_images, write_previews
from inline.latency import Percentiles
from inline.mrdfile import RawScan, read_scan
from inline.server import InlineServer
from inline.session import LATENCY_META_KEY, SessionSettings

log = logging.getLogger(__name__)


def image_latency_ms(image: ismrmrd.Image) -> float:
    """Server-measured latency of a returned image (meta key set at send) [ms]; NaN if absent."""
    try:
        return float(ismrmrd.Meta.deserialize(image.attribute_string)[LATENCY_META_KEY])
    except (KeyError, ValueError, TypeError):
        return float("nan")


def simulated_demo_scan(slices: int = 10, coils: int = 32, matrix: int = 256) -> RawScan:
    from inline.simulate import simulate_scan

    # a 2D multi-slice spoiled gradient echo, TR 100 ms at about the Ernst angle of white
    # matter: 256 lines in 26 s at scanner pace
    sim = simulate_scan(matrix=matrix, slices=slices, coils=coils, tr_ms=100.0, flip_angle_deg=25.0)
    return RawScan(sim.header_xml, list(sim.acquisitions))


def run_demo(
    file: Path | None,
    out_dir: Path,
    config: str = "default",
    pace: str = "realtime",
    slices: int = 10,
    coils: int = 32,
    matrix: int = 256,
    console: Console | None = None,
) -> int:
    """Run the demo; returns a process exit code (non-zero when the server reported an error)."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    if file is None:
        console.print(f"[bold]Simulating[/] a {slices}-slice, {coils}-coil, {matrix}x{matrix} scan from the MNI152 template ...")
        scan = simulated_demo_scan(slices, coils, matrix)
    else:
        scan = read_scan(file)
    n_acq = len(scan.acquisitions)
    # as `inline serve` runs it: the QC taps in a worker process
    server = InlineServer("127.0.0.1", 0, SessionSettings(journal_dir=out_dir / "journal"), tap_workers=1)
    server.settings.tap_host.wait_ready(60)
    server.start_background()
    console.print(f"Server on 127.0.0.1:{server.port}; streaming {n_acq} acquisitions ({pace} pace), config {config!r}")

    table = Table(title="images returned", expand=False)
    for col in ("#", "series", "slice", "rep", "matrix", "latency after last readout [ms]"):
        table.add_column(col, justify="right")
    rows: list[ismrmrd.Image] = []

    def on_image(im: ismrmrd.Image) -> None:
        rows.append(im)
        table.add_row(
            str(len(rows)),
            str(im.image_series_index),
            str(im.slice),
            str(im.repetition),
            "x".join(str(int(m)) for m in im.matrix_size),
            f"{image_latency_ms(im):.1f}",
        )

    try:
        with Live(table, console=console, refresh_per_second=8, transient=False):
            result = send_scan(scan, "127.0.0.1", server.port, config_name=config, pace=pace, on_image=on_image)
    finally:
        server.stop()
    console.print()
    for t in result.texts:
        console.print(t, style="red" if t.startswith("ERROR") else "dim", markup=False, highlight=False)
    write_images(result.images, out_dir / "out.h5")
    previews = write_previews(result.images, out_dir, prefix="preview") if result.images else []
    lat = Percentiles.of_ns(np.array([image_latency_ms(im) for im in result.images]) * 1e6)
    console.print(
        f"[bold]{len(result.images)} images[/]; latency after last readout p50 {lat.p50_ms:.1f} ms, "
        f"p99 {lat.p99_ms:.1f} ms, max {lat.max_ms:.1f} ms"
    )
    console.print(f"wrote {out_dir / 'out.h5'}" + "".join(f", {p}" for p in previews))
    return 1 if result.errors or not result.closed else 0
