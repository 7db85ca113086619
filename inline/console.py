"""``inline console``: the radiographer's live terminal view of the alert bus.

Subscribes to the server's alert bus (:class:`inline.qc.views.BusSubscriber`) and shows,
refreshed a few times a second: the sessions, the latest images with their latencies, and
the alerts, newest first, coloured by severity (critical red, warning yellow, info blue)
with their suggested actions. Commands typed on stdin, one a line:

- ``a``: acknowledge every active alert; ``a 3``: acknowledge alert ``#3``;
- ``q``: quit.

Without a terminal (output piped to a file) it prints one line per bus message instead of
the live view; stdin commands work either way.
"""

from __future__ import annotations

import logging
import sys
import threading
from datetime import datetime
from typing import IO, Any

from rich.console import Console, RenderableType
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from inline.qc.alert import slice_label
from inline.qc.views import SEVERITIES, BusSubscriber, ViewState

log = logging.getLogger(__name__)

SEVERITY_STYLE = {"critical": "red", "warning": "yellow", "info": "blue"}
BADGE_STYLE = {"critical": "bold white on red", "warning": "bold black on yellow", "info": "bold white on blue"}
HELP = "a + Enter: acknowledge all   a N + Enter: acknowledge #N   q + Enter: quit"


def _clock(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S") if t else "-"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _where(alert: dict[str, Any]) -> str:
    parts = [alert.get("series") or "", slice_label(list(alert.get("slices") or []))]
    if alert.get("repetition") is not None:
        parts.append(f"rep {alert['repetition']}")
    if alert.get("value") is not None and alert.get("threshold") is not None:
        unit = f" {alert['unit']}" if alert.get("unit") else ""
        parts.append(f"{alert['value']:.3g} vs {alert['threshold']:.3g}{unit}")
    return "\n".join(p for p in parts if p)


def header_view(state: dict[str, Any]) -> RenderableType:
    text = Text.assemble(("inline QC", "bold"), f"  bus {state['endpoint'] or '-'}  ")
    for sev in SEVERITIES:
        n = state["counts"][sev]
        text.append(f" {n} {sev} ", BADGE_STYLE[sev] if n else "dim")
        text.append(" ")
    last = state["last_message_unix_s"]
    text.append(f"  last message {_clock(last)}" if last else "  waiting for the server ...", "dim")
    return Panel(text, padding=(0, 1))


def sessions_view(state: dict[str, Any]) -> RenderableType:
    table = Table(expand=True, show_edge=False, pad_edge=False)
    for col, justify in (("", "left"), ("scanner", "left"), ("series", "left"), ("config", "left"), ("images", "right"), ("last ms", "right"), ("max ms", "right"), ("alerts", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for s in state["sessions"]:
        status = Text("● live", "bold green") if s["active"] else Text("ended" if not s["error"] else "failed", "dim" if not s["error"] else "red")
        table.add_row(status, s["scanner"], s["series"], s["config"], str(s["images"]), _ms(s["latency_last_ms"]), _ms(s["latency_max_ms"]), str(s["alerts"]), style=None if s["active"] else "dim")
    return Panel(table, title="sessions", title_align="left")


def images_view(state: dict[str, Any], max_rows: int = 12) -> RenderableType:
    table = Table(expand=True, show_edge=False, pad_edge=False)
    for col in ("time", "series", "image", "slice", "rep", "matrix", "latency ms", "alerts"):
        table.add_column(col, justify="left" if col in ("time", "alerts") else "right")
    for im in state["images"][:max_rows]:
        matrix = "x".join(str(m) for m in im.get("matrix") or []) or "-"
        table.add_row(
            _clock(im.get("time_unix_s")), str(im.get("series_index", "-")), str(im.get("image_index", "-")),
            str(im.get("slice", "-")), str(im.get("repetition", "-")), matrix, Text(_ms(im["latency_ms"]), "bold"),
            Text(", ".join(im["alerts"]), "red" if im["alerts"] else ""),
        )  # fmt: skip
    return Panel(table, title="latest images (latency after last readout)", title_align="left")


def alerts_view(state: dict[str, Any], max_acknowledged: int = 5) -> RenderableType:
    table = Table(expand=True, show_edge=False, pad_edge=False, show_lines=True)
    table.add_column("#", justify="right", width=4)
    table.add_column("severity", width=14)
    table.add_column("alert and what to do", ratio=3)
    table.add_column("where", ratio=1)
    table.add_column("time", width=8)

    def row(a: dict[str, Any], acknowledged: bool) -> None:
        sev = a["severity"]
        what = Text.assemble((f"[{a['code']}] ", "bold"), (a["message"], f"bold {SEVERITY_STYLE[sev]}"))
        if a["action"]:
            what.append("\n→ " + a["action"], SEVERITY_STYLE[sev] if not acknowledged else "")
        badge = Text(f" {sev} ", BADGE_STYLE[sev]) if not acknowledged else Text(f"{sev} ✓ ack", "dim")
        table.add_row(f"#{a['number']}", badge, what, _where(a), _clock(a.get("time_unix_s")), style="dim" if acknowledged else None)

    for a in state["alerts"]:
        row(a, False)
    for a in state["acknowledged"][:max_acknowledged]:
        row(a, True)
    if not state["alerts"] and not state["acknowledged"]:
        table.add_row("", "", Text("no alerts", "green"), "", "")
    n = len(state["alerts"])
    title = f"alerts: {n} to acknowledge" if n else "alerts: none to acknowledge"
    return Panel(table, title=title, title_align="left", border_style="red" if state["counts"]["critical"] else "white")


def render_view(state: ViewState | dict[str, Any], feedback: str = "", max_images: int = 12) -> Layout:
    """The whole console view of one snapshot (a :class:`Layout` filling the console)."""
    snap = state.to_dict() if isinstance(state, ViewState) else state
    layout = Layout()
    layout.split_column(Layout(name="header", size=3), Layout(name="alerts", ratio=3), Layout(name="bottom", ratio=2), Layout(name="footer", size=1))
    layout["bottom"].split_row(Layout(sessions_view(snap), name="sessions"), Layout(images_view(snap, max_images), name="images"))
    layout["header"].update(header_view(snap))
    layout["alerts"].update(alerts_view(snap))
    layout["footer"].update(Text.assemble((HELP, "dim"), ("   " + feedback if feedback else "", "bold")))
    return layout


def handle_command(state: ViewState, line: str) -> str | None:
    """Apply one typed command; returns feedback to show, or None for quit."""
    words = line.strip().lower().split()
    if not words:
        return ""
    if words[0] in ("q", "quit", "exit"):
        return None
    if words[0] in ("a", "ack"):
        if len(words) == 1 or words[1] == "all":
            return f"{state.ack_all()} alert(s) acknowledged"
        results = []
        for w in words[1:]:
            n = w.lstrip("#")
            if not n.isdigit():
                return f"not an alert number: {w!r}"
            results.append(f"#{n} acknowledged" if state.ack_number(int(n)) else f"#{n}: no such active alert")
        return "; ".join(results)
    return f"unknown command {line.strip()!r} ({HELP})"


def _line(topic: str, payload: Any) -> Text | None:
    """One printed line per bus message (the view without a terminal)."""
    if not isinstance(payload, dict):
        return None
    if topic.startswith("alert."):
        sev = str(payload.get("severity", "info"))
        style = SEVERITY_STYLE.get(sev, "")
        return Text.assemble((f"{sev.upper():<8}", f"bold {style}"), f" [{payload.get('code')}] ", (str(payload.get("message", "")), style), " → ", str(payload.get("action", "")))
    if topic == "event.image":
        return Text(f"image  session {payload.get('session')} slice {payload.get('slice')} rep {payload.get('repetition')} latency {_ms(payload.get('latency_ms'))} ms", "dim")
    if topic.startswith("event.session."):
        what = topic.rsplit(".", 1)[-1]
        extra = f" images {payload.get('images')}" if what == "end" else ""
        err = f" error: {payload['error']}" if payload.get("error") else ""
        return Text(f"session {what} {payload.get('session')} {payload.get('scanner', '')} {payload.get('series', '')} config {payload.get('config', '')}{extra}{err}", "red" if err else "")
    if topic == "view.ack":
        return Text(f"acknowledged {payload.get('count', 1)} alert(s)", "dim")
    return None


def run_console(
    endpoint: str,
    *,
    console: Console | None = None,
    input_stream: IO[str] | None = None,
    refresh_per_second: float = 4.0,
    max_images: int = 12,
    stop: threading.Event | None = None,
    live: bool | None = None,
) -> int:
    """Show the live view of the alert bus at ``endpoint`` until ``q``, Ctrl-C or ``stop``.

    Args:
        endpoint: the server's alert bus, e.g. ``tcp://127.0.0.1:5557``.
        console: where to draw (default: stdout).
        input_stream: where commands are read, one a line (default: stdin).
        refresh_per_second: redraw rate of the live view [Hz].
        max_images: rows in the latest-images table.
        stop: set it to end the view (tests, embedding).
        live: full-screen live view (default: when the console is a terminal), else one
            printed line per bus message.

    Returns:
        a process exit code (0).
    """
    console = console or Console()
    stop = stop or threading.Event()
    state = ViewState(max_images=max(max_images, 20))
    feedback = {"text": ""}
    live = console.is_terminal if live is None else live

    def read_commands() -> None:
        stream = input_stream if input_stream is not None else sys.stdin
        try:
            for line in stream:
                result = handle_command(state, line)
                if result is None:
                    stop.set()
                    state.wake()
                    return
                feedback["text"] = result
                if not live and result:
                    console.print(result, style="bold", markup=False, highlight=False)
        except (OSError, ValueError):  # stdin closed under us
            return
        if getattr(stream, "isatty", lambda: False)():
            stop.set()  # Ctrl-D on a terminal quits; a piped-in EOF (/dev/null) leaves the view running
            state.wake()

    subscriber = BusSubscriber(state, endpoint).start()
    threading.Thread(target=read_commands, name="console-input", daemon=True).start()
    try:
        if live:
            with Live(render_view(state, max_images=max_images), console=console, screen=True, auto_refresh=False) as view:
                version = -1
                while not stop.is_set():
                    # redraw on change, and every second for the clock of the last message
                    version = state.wait_for_change(version, timeout=1.0)
                    view.update(render_view(state, feedback["text"], max_images), refresh=True)
                    stop.wait(1.0 / refresh_per_second)
        else:
            console.print(f"inline console: subscribed to {endpoint}; {HELP}", style="dim", markup=False, highlight=False)
            version = 0
            while not stop.is_set():
                state.wait_for_change(version, timeout=0.5)
                for version, topic, payload in state.events_since(version):
                    line = _line(topic, payload)
                    if line is not None:
                        console.print(line, markup=False, highlight=False)
    except KeyboardInterrupt:
        pass
    finally:
        subscriber.stop()
    return 0


__all__ = ["render_view", "handle_command", "run_console", "sessions_view", "images_view", "alerts_view", "header_view"]

if __name__ == "__main__":  # pragma: no cover - manual use: python -m inline.console tcp://...
    sys.exit(run_console(sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5557"))
