"""The ``gadgetron`` Python package's reference external-module recon as a benchmark peer.

``python -m inline.benchmark.gadgetron_peer --port P`` listens on ``127.0.0.1:P`` and runs,
for each connection, ``gadgetron.examples.recon_acquisitions.recon_acquisitions`` (noise
adjustment, oversampling removal, accumulation on LAST_IN_SLICE, centred inverse FFT, RSS)
over the package's own :class:`gadgetron.external.connection.Connection`, fed by the same
replay client as our server. Its protocol is MRD v1 with a CONFIG_TEXT config, so the
client sends the config as text.

The only addition is measurement, made the way our session makes it: the connection's
reads are wrapped to note when each message has been read, and its ``send`` to write the
image's latency (send minus the read of the last readout before it: the example's
generators are lazy, so an image is made right after its slice's last readout is read)
into the image meta under :data:`inline.session.LATENCY_META_KEY`.
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time

import ismrmrd

LATENCY_META_KEY = "InlineLatencyAfterLastReadout_ms"  # inline.session's, without importing the runtime

log = logging.getLogger(__name__)


def unavailable() -> str | None:
    """Why the peer cannot run here (the package or its example is missing), or None."""
    try:
        import gadgetron.examples.recon_acquisitions  # noqa: F401
        from gadgetron.external.connection import Connection  # noqa: F401
    except ImportError as e:
        return f"gadgetron package not installed ({e}); pip install gadgetron"
    return None


def version() -> str | None:
    try:
        from importlib.metadata import version as v

        return v("gadgetron")
    except Exception:
        return None


def handle(sock: socket.socket) -> None:
    """Serve one connection with the package's example recon, instrumented."""
    from gadgetron.examples.recon_acquisitions import recon_acquisitions
    from gadgetron.external.connection import Connection

    with Connection(sock) as connection:
        last_read_ns = [time.perf_counter_ns()]
        read_item, send = connection._read_item, connection.send

        def timed_read():
            item = read_item()
            last_read_ns[0] = time.perf_counter_ns()
            return item

        def timed_send(item):
            if isinstance(item, ismrmrd.Image):
                latency_ms = (time.perf_counter_ns() - last_read_ns[0]) / 1e6
                meta = ismrmrd.Meta.deserialize(item.attribute_string) if item.attribute_string else ismrmrd.Meta()
                meta[LATENCY_META_KEY] = f"{latency_ms:.3f}"
                item.attribute_string = meta.serialize()
            return send(item)

        connection._read_item = timed_read
        connection.send = timed_send
        recon_acquisitions(connection)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Accept connections forever, one thread each."""
    with socket.create_server((host, port)) as server:
        while True:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_handle_safely, args=(conn,), daemon=True).start()


def _handle_safely(conn: socket.socket) -> None:
    try:
        handle(conn)
    except Exception:  # one broken session must not stop the peer
        log.exception("gadgetron peer: session failed")
        try:
            conn.close()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    serve(args.port)


if __name__ == "__main__":
    main()
