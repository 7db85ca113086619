"""Shared fixtures: real scanner data, generated reference data, a live server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_files() -> list[Path]:
    return sorted(SHARED_DATA.glob("*.h5")) if SHARED_DATA.is_dir() else []


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not shared_data_files():
        pytest.skip(f"real scanner data not found in {SHARED_DATA} (the shared data folder is absent on this machine)")
    return SHARED_DATA


def generate_shepp_logan(out: Path, *args: str) -> Path:
    """Run Debian's ismrmrd_generate_cartesian_shepp_logan (third-party reference data)."""
    exe = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if exe is None:
        pytest.skip("ismrmrd_generate_cartesian_shepp_logan not on PATH (apt-get install ismrmrd-tools)")
    subprocess.run([exe, *args, "-o", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def small_scan(tmp_path_factory) -> Path:
    """Shepp-Logan, 64x64 (128 readout samples, 2x oversampled), 4 coils, noise calibration, 2 repetitions."""
    return generate_shepp_logan(tmp_path_factory.mktemp("sl") / "small.h5", "-m", "64", "-c", "4", "-r", "2", "-C")


@pytest.fixture
def server(tmp_path):
    from inline.server import InlineServer
    from inline.session import SessionSettings

    srv = InlineServer("127.0.0.1", 0, SessionSettings(journal_dir=tmp_path / "journal", idle_timeout_s=5.0))
    srv.start_background()
    yield srv
    srv.stop()


def wait_for_files(directory: Path, pattern: str, count: int = 1, timeout_s: float = 20.0) -> list[Path]:
    """The journal's .h5 copy is written after the session's CLOSE; wait for it."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        found = sorted(Path(directory).glob(pattern))
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
def browser_page():
    """A page of Debian's headless Chromium driven by playwright (no browser download)."""
    import os
    import tempfile

    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (its browser download is not needed)")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.skip(f"Chromium not found at {chromium} (apt-get install chromium)")
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1600, "height": 1000}
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
