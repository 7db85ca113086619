"""The DL chain through a real server: a model preloaded and warmed up at server start,
shared by sessions (loaded exactly once), images carrying the method in their meta."""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import pytest
import yaml

torch = pytest.importorskip("torch", reason="the DL gadget needs PyTorch (pip install 'inline[dl]')")

import gadgets.dl_recon as dl  # noqa: E402
from inline import inference  # noqa: E402
from inline.client import send_scan  # noqa: E402
from inline.config import BUILTIN_CONFIG_DIR, config_search_path  # noqa: E402
from inline.mrdfile import RawScan  # noqa: E402
from inline.server import PRELOAD_ALL, InlineServer, warmup_stages  # noqa: E402
from inline.session import SessionSettings  # noqa: E402
from inline.simulate import simulate_scan  # noqa: E402
from models.varnet import VarNet  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    """A config directory with ``dl_tiny``: configs/dl_recon.yaml with a small random checkpoint."""
    torch.manual_seed(0)
    net = VarNet(cascades=2, chans=4, pools=2)
    weights = tmp_path / "tiny.pt"
    torch.save({"config": net.config, "state_dict": net.state_dict(), "meta": {}}, weights)
    spec = yaml.safe_load((BUILTIN_CONFIG_DIR / "dl_recon.yaml").read_text())
    spec["name"] = "dl_tiny"
    stage = next(g for g in spec["gadgets"] if g["name"] == "dl_recon")
    # a generous budget: this test is about loading and sharing, not speed on a busy CPU
    stage["parameters"].update(model=str(weights), device="cpu", backends=["eager"], budget_ms=20000, warmup_shapes=[[8, 64, 64]])
    cfg = tmp_path / "configs"
    cfg.mkdir()
    (cfg / "dl_tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return cfg


@pytest.fixture
def clean_cache():
    inference.clear_cache()
    yield
    inference.clear_cache()


def test_preloaded_model_is_shared_by_sessions(tmp_path, tiny_config, clean_cache):
    settings = SessionSettings(config_dirs=[tiny_config], journal_dir=tmp_path / "journal", idle_timeout_s=30.0)
    server = InlineServer("127.0.0.1", 0, settings, preload=["dl_tiny"])
    server.start_background()
    try:
        assert server.warmup_done.wait(120), "warm-up did not finish"
        (result,) = server.warmup_results.values()
        assert result.startswith("ok in ") and "shapes [(1, 8, 64, 64)]" in result, server.warmup_results
        assert inference.cache_stats().loads == 1
        sim = simulate_scan(matrix=64, slices=2, coils=8, acceleration=4, acs_lines=12)
        for _ in range(2):
            res = send_scan(RawScan(sim.header_xml, list(sim.acquisitions)), "127.0.0.1", server.port, config_name="dl_tiny")
            assert res.closed and not res.errors, res.texts
            assert len(res.images) == 2
            for image in res.images:
                meta = ismrmrd.Meta.deserialize(image.attribute_string)
                assert meta[dl.META_METHOD] == "DL-VARNET"
                assert meta[dl.META_BACKEND] == "eager"
                assert "DL-VARNET" in meta["ImageProcessingHistory"]
            assert not [t for t in res.texts if "reconstructed by GRAPPA" in t]
        stats = inference.cache_stats()
        assert stats.loads == 1 and stats.hits >= 2, stats  # one load, shared by both sessions
    finally:
        server.stop()


def test_without_preload_nothing_is_loaded_at_start(tiny_config, clean_cache):
    server = InlineServer("127.0.0.1", 0, SessionSettings(config_dirs=[tiny_config]))
    try:
        assert server.warmup_done.is_set() and server.warmup_results == {}
        assert inference.cache_stats().loads == 0
    finally:
        server.server_close()


def test_preload_all_finds_configs_with_a_warm_up_hook(tiny_config):
    found = {(config, stage.name) for config, stage in warmup_stages(None, config_search_path([tiny_config]))}
    assert {("dl_recon", "dl_recon"), ("dl_tiny", "dl_recon")} <= found
    assert not {c for c, _ in found} & {"default", "cs", "grappa"}
    assert PRELOAD_ALL == "all"


def test_a_failing_warm_up_does_not_stop_the_server(tmp_path, tiny_config, clean_cache):
    spec = yaml.safe_load((tiny_config / "dl_tiny.yaml").read_text())
    spec["name"] = "dl_missing"
    next(g for g in spec["gadgets"] if g["name"] == "dl_recon")["parameters"]["model"] = str(tmp_path / "absent.pt")
    (tiny_config / "dl_missing.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    server = InlineServer("127.0.0.1", 0, SessionSettings(config_dirs=[tiny_config]), preload=["dl_missing", "dl_tiny"])
    try:
        assert server.warmup_done.wait(120)
        assert server.warmup_results["dl_missing/dl_recon"].startswith("failed: FileNotFoundError"), server.warmup_results
        assert server.warmup_results["dl_tiny/dl_recon"].startswith("ok in ")
    finally:
        server.server_close()


def test_cli_serve_has_preload_options():
    from typer.testing import CliRunner

    from inline.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--preload" in out and "--no-warmup" in out
