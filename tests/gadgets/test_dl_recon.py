"""DLRecon: conventions shared with training (compression, scaling, masks), numbers equal to
the network run directly, fallbacks (exception, budget overrun, busy worker, no model),
image meta through the standard chain, coil counts, 3D refusal.

The network is a small random VarNet (``cascades=2, chans=4, pools=2``) or a stub; the
trained weights are used only in :func:`test_trained_weights_beat_zero_filled`, skipped when
they are not there. Ground truth as in ``test_cs.py``: RSS of the simulator's noise-free coil
images, one real scale fitted per image, NRMSE over the object support.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from chain_helpers import build_chain, centred_ifft, context, payloads, run_chain

torch = pytest.importorskip("torch", reason="the DL gadget needs PyTorch (pip install 'inline[dl]')")

import gadgets.dl_recon as dl  # noqa: E402
from gadgets.dl_recon import DLRecon, DLReconError  # noqa: E402
from gadgets.dl_refine import refine_maps, sense_refine  # noqa: E402
from inline import inference  # noqa: E402
from inline.buffers import ReconBuffer  # noqa: E402
from inline.coils import compress, compression_matrix  # noqa: E402
from inline.config import load_chain, validate_chain  # noqa: E402
from inline.gadget import Text  # noqa: E402
from inline.registry import lookup  # noqa: E402
from inline.simulate import simulate_scan  # noqa: E402
from models.data import input_scale  # noqa: E402
from models.varnet import VarNet  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DL_CONFIG = REPO / "configs" / "dl_recon.yaml"
CS_CONFIG = REPO / "configs" / "cs.yaml"

pytestmark = pytest.mark.timeout(300)


# -- fixtures and helpers ----------------------------------------------------------------------
def simulated(coils: int = 8, matrix: int = 64, acs_lines: int = 12, slices: int = 1, seed: int = 1):
    return simulate_scan(matrix=matrix, slices=slices, coils=coils, acceleration=4, acs_lines=acs_lines, snr=40, seed=seed, noise_samples=0)


def buffers_of(scan) -> list[ReconBuffer]:
    ctx = context(scan.header)
    chain = [lookup(n)(ctx) for n in ("RemoveReadoutOversampling", "AcquisitionAccumulateTrigger")]
    return payloads(run_chain(chain, scan.acquisitions), ReconBuffer)


def truth_of(scan, z: int = 0) -> np.ndarray:
    return np.sqrt(np.sum(np.abs(scan.coil_maps * scan.images[None]) ** 2, axis=0))[z]


def score(image: np.ndarray, truth: np.ndarray) -> float:
    support = truth > 0.05 * truth.max()
    a, t = np.abs(image)[support], truth[support]
    return float(np.linalg.norm(np.dot(a, t) / np.dot(a, a) * a - t) / np.linalg.norm(t))


def rss_image(k: np.ndarray) -> np.ndarray:
    """``(coils, 1, ky, kx)`` k-space -> ``(y, x)`` RSS image."""
    return np.sqrt(np.sum(np.abs(centred_ifft(k, (2, 3))) ** 2, axis=0))[0]


@pytest.fixture(scope="module")
def case():
    scan = simulated()
    (buf,) = buffers_of(scan)
    return scan, buf


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return VarNet(cascades=2, chans=4, pools=2).eval()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, net) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save({"config": net.config, "state_dict": net.state_dict(), "meta": {}}, path)
    return path


@pytest.fixture
def tiny(monkeypatch, tiny_weights):
    """Every DLRecon loads the small random network through the real engine (eager, CPU)."""
    real = dl._load_model

    def load(params, warm_up=()):
        return real(params.model_copy(update={"model": str(tiny_weights), "backends": ["eager"], "device": "cpu"}), warm_up)

    monkeypatch.setattr(dl, "_load_model", load)
    return tiny_weights


class Stub:
    """A model that records its inputs, may raise or sleep, and returns its input k-space."""

    backend = "stub"

    def __init__(self, error: Exception | None = None, sleep_s: float = 0.0, sleep_calls: int = 1):
        self.error, self.sleep_s, self.sleep_calls = error, sleep_s, sleep_calls
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.finished = threading.Event()

    def run(self, kspace, mask, acs_mask):
        self.calls.append((kspace.copy(), mask.copy(), acs_mask.copy()))
        if self.error is not None:
            raise self.error
        if len(self.calls) <= self.sleep_calls and self.sleep_s:
            time.sleep(self.sleep_s)
            self.finished.set()
        return kspace.copy()

    def warm_up(self, shapes):
        self.warmed = list(shapes)


def with_stub(monkeypatch, stub: Stub) -> Stub:
    monkeypatch.setattr(dl, "_load_model", lambda params, warm_up=(): stub)
    return stub


def gadget(header, **params) -> DLRecon:
    return DLRecon(context(header), DLRecon.Params(**params))


def split(outputs) -> tuple[list[ReconBuffer], list[str]]:
    items = [o for o, _ in outputs]
    return [o for o in items if isinstance(o, ReconBuffer)], [str(o) for o in items if isinstance(o, Text)]


# -- output and numbers --------------------------------------------------------------------------
def test_output_is_virtual_coil_kspace_with_dl_meta(case, tiny):
    scan, buf = case
    g = gadget(scan.header, budget_ms=None)
    (out,), texts = split(g.process(buf, None))
    assert not texts
    assert out.data.shape == (8, 1, 64, 64) and out.data.dtype == np.complex64
    assert out.sampled.shape == buf.sampled.shape and bool(out.sampled.all())
    assert out.reference is None and out.reference_sampled is None
    assert out.history[-3:] == ["DL-VARNET", "BACKEND-EAGER", "SENSE-DC"]
    assert out.meta[dl.META_METHOD] == "DL-VARNET" and out.meta[dl.META_BACKEND] == "eager"
    assert out.meta[dl.META_REFINE].startswith("SENSE-DC lambda=0.03, ")
    assert out.meta[dl.META_MODEL] == "varnet_mni152" and float(out.meta[dl.META_INFERENCE_MS]) > 0
    assert np.isfinite(out.data).all() and np.abs(out.data).max() > 0
    assert g.counts["dl"] == 1 and g.timings[0]["method"] == "DL-VARNET"
    assert not list(g.close())


@pytest.mark.parametrize("refine", [False, True])
def test_result_equals_the_network_run_directly(case, tiny, net, refine):
    """Independent re-implementation of the training conventions (models/data.py); with
    ``refine``, the network's k-space then goes through the SENSE step on the scaled data."""
    scan, buf = case
    out = next(o for o, _ in gadget(scan.header, budget_ms=None, refine=refine).process(buf, None))
    ref_lines = buf.reference_sampled[0]
    filled = np.where((ref_lines & ~buf.sampled[0])[None, :, None], buf.reference[:, 0], buf.data[:, 0])
    known = buf.sampled[0] | ref_lines
    acs = ref_lines  # one contiguous centred block here
    cc = compression_matrix(filled[:, acs], 8)
    k = compress(filled, cc) * known[None, :, None]
    scale = input_scale(k, acs)
    as_mask = lambda m: torch.from_numpy(m.astype(np.float32)).view(1, 1, -1, 1)  # noqa: E731
    with torch.inference_mode():
        direct = net(torch.from_numpy((k / scale).astype(np.complex64))[None], as_mask(known), as_mask(acs))[0].numpy()
    if refine:
        scaled = (k / scale).astype(np.complex64)
        direct, _ = sense_refine(direct, scaled, known, refine_maps(scaled, acs))
    direct = direct * scale
    err = np.linalg.norm(out.data[:, 0] - direct) / np.linalg.norm(direct)
    assert err < 1e-5, err


def test_chain_image_carries_method_and_backend(tiny):
    scan = simulated(slices=2, seed=7)
    overrides = {"dl_recon": {"budget_ms": None}, "finish": {"data_type": "float"}}
    outputs = run_chain(build_chain(scan.header, DL_CONFIG, overrides), scan.acquisitions)
    images = payloads(outputs, ismrmrd.Image)
    assert len(images) == 2 and not [t for t in payloads(outputs, Text) if "DLRecon" in t]
    for image in images:
        meta = ismrmrd.Meta.deserialize(image.attribute_string)
        assert meta[dl.META_METHOD] == "DL-VARNET" and meta[dl.META_BACKEND] == "eager"
        assert meta["ImageProcessingHistory"][-6:] == ["DL-VARNET", "BACKEND-EAGER", "SENSE-DC", "FFT", "RSS", "MAGNITUDE"]
        assert image.data.shape == (1, 1, 64, 64)


def test_acs_only_lines_are_used_as_data(case, monkeypatch):
    scan, buf = case
    stub = with_stub(monkeypatch, Stub())
    out = next(o for o, _ in gadget(scan.header, budget_ms=None, refine=False).process(buf, None))
    (k, mask, acs_mask), = stub.calls
    sampled, ref = buf.sampled[0], buf.reference_sampled[0]
    acs_only = ref & ~sampled
    assert acs_only.sum() == 9  # 12 ACS lines, 3 of them imaging lines at R = 4
    assert np.array_equal(mask[0, 0, :, 0] > 0, sampled | ref)  # every known line is data
    assert np.array_equal(acs_mask[0, 0, :, 0] > 0, ref)  # the ACS block is the calibration region
    line_energy = np.abs(k[0]).sum(axis=(0, 2))
    assert (line_energy[acs_only] > 0).all() and (line_energy[~(sampled | ref)] == 0).all()
    # the identity stub gives back the compressed input: the ACS-only lines carry the reference data
    cc = compression_matrix(buf.reference[:, 0][:, ref], 8)
    expected = compress(buf.reference[:, 0][:, acs_only], cc)
    assert np.allclose(out.data[:, 0][:, acs_only], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("coils", [2, 8, 32])
def test_coil_counts(coils, tiny):
    scan = simulated(coils=coils, seed=coils)
    (buf,) = buffers_of(scan)
    g = gadget(scan.header, budget_ms=None)
    (out,), texts = split(g.process(buf, None))
    assert not texts and out.meta[dl.META_METHOD] == "DL-VARNET"
    assert out.data.shape == (min(coils, 8), 1, 64, 64)
    assert np.isfinite(out.data).all()


def test_compression_matrix_cached_per_slice_geometry(tiny):
    scan = simulated(slices=2)
    b0, b1 = buffers_of(scan)
    g = gadget(scan.header, budget_ms=None)
    for b in (b0, b0, b1, b1):
        list(g.process(b, None))
    assert len(g._matrices) == 2 and g.counts["dl"] == 4


def test_fully_sampled_passes_compressed_without_the_network(monkeypatch):
    stub = with_stub(monkeypatch, Stub())
    scan = simulate_scan(matrix=64, slices=1, coils=8, acceleration=1, seed=3, noise_samples=0)
    (buf,) = buffers_of(scan)
    (out,), _ = split(gadget(scan.header).process(buf, None))
    assert not stub.calls and out.meta[dl.META_METHOD] == "FFT (fully sampled)"
    assert out.data.shape == (8, 1, 64, 64)
    assert np.allclose(rss_image(out.data), rss_image(buf.data), rtol=1e-4, atol=1e-5 * np.abs(rss_image(buf.data)).max())


def test_3d_buffer_is_refused(case, tiny):
    scan, buf = case
    data = np.repeat(buf.data, 4, axis=1)
    buf3d = ReconBuffer(**{**buf.__dict__, "data": data, "sampled": np.repeat(buf.sampled, 4, axis=0), "reference": None, "reference_sampled": None})
    with pytest.raises(ValueError, match="3D buffer with kz = 4"):
        list(gadget(scan.header).process(buf3d, None))
    with pytest.raises(DLReconError, match="coils, kz, ky, kx"):
        list(gadget(scan.header).process(ReconBuffer(**{**buf.__dict__, "data": buf.data[:, 0]}), None))


# -- fallbacks -------------------------------------------------------------------------------------
def test_fallback_on_exception_grappa(case, monkeypatch):
    scan, buf = case
    with_stub(monkeypatch, Stub(error=RuntimeError("CUDA out of memory")))
    g = gadget(scan.header)
    outputs = list(g.process(buf, None)) + list(g.process(buf, None))
    bufs, texts = split(outputs)
    assert len(bufs) == 2 and len(texts) == 1  # one TEXT per kind of failure, not per slice
    assert texts[0].startswith("WARNING ") and "GRAPPA" in texts[0] and "CUDA out of memory" in texts[0]
    out = bufs[0]
    assert out.history[-1] == "GRAPPA R=4x1" and out.data.shape == (8, 1, 64, 64)
    assert out.meta[dl.META_METHOD] == "GRAPPA R=4x1 (fallback: inference error (RuntimeError: CUDA out of memory))"
    assert dl.META_BACKEND not in out.meta
    zero_filled = score(rss_image(buf.data), truth_of(scan))
    grappa = score(rss_image(out.data), truth_of(scan))
    print(f"NRMSE vs truth: GRAPPA fallback {grappa:.4f}, zero-filled {zero_filled:.4f}")
    assert grappa < 0.5 * zero_filled
    (summary,) = [str(t) for t, _ in g.close()]
    assert summary.startswith("WARNING ") and "2 of 2 slices reconstructed by GRAPPA" in summary


def test_fallback_cs_through_the_chain_meta_on_the_image(monkeypatch):
    """The full dl_recon chain: image produced, TEXT sent, meta on the image, better than zero-filled."""
    with_stub(monkeypatch, Stub(error=RuntimeError("engine crashed")))
    scan = simulated(matrix=96, acs_lines=24, seed=5)
    overrides = {"finish": {"data_type": "float"}, "noise": {"perform_noise_adjust": False}, "dl_recon": {"fallback": "cs"}}
    outputs = run_chain(build_chain(scan.header, DL_CONFIG, overrides), scan.acquisitions)
    images = payloads(outputs, ismrmrd.Image)
    texts = [str(t) for t in payloads(outputs, Text)]
    assert len(images) == 1
    assert any(t.startswith("WARNING ") and "engine crashed" in t for t in texts)
    meta = ismrmrd.Meta.deserialize(images[0].attribute_string)
    assert meta[dl.META_METHOD] == "CS-L1WAVELET (fallback: inference error (RuntimeError: engine crashed))"
    assert meta[dl.META_FALLBACK] == "inference error (RuntimeError: engine crashed)"
    assert "CS-L1WAVELET" in meta["ImageProcessingHistory"]
    (buf,) = buffers_of(scan)
    truth = truth_of(scan)
    cs, zf = score(images[0].data[0, 0], truth), score(rss_image(buf.data), truth)
    print(f"NRMSE vs truth: CS fallback {cs:.4f}, zero-filled {zf:.4f}")
    assert cs < 0.3 * zf


def test_fallback_on_budget_overrun_and_busy_worker(monkeypatch):
    scan = simulated(slices=3)
    b0, b1, b2 = buffers_of(scan)
    stub = with_stub(monkeypatch, Stub(sleep_s=1.5, sleep_calls=1))
    g = gadget(scan.header, budget_ms=100)
    t0 = time.perf_counter()
    (late,), texts_late = split(g.process(b0, None))
    took = time.perf_counter() - t0
    assert took < 1.2, f"the gadget waited for the late network ({took:.2f} s)"
    assert late.meta[dl.META_METHOD] == "GRAPPA R=4x1 (fallback: inference not done within 100 ms)"
    # the worker is still busy with slice 0: slice 1 falls back at once, without queueing
    (busy,), texts_busy = split(g.process(b1, None))
    assert busy.meta[dl.META_FALLBACK] == "network still busy with an earlier, late slice"
    assert len(stub.calls) == 1
    assert [t.split(":")[0] for t in texts_late + texts_busy] == ["WARNING DLRecon"] * 2
    assert "not done within 100 ms" in texts_late[0] and "busy" in texts_busy[0]
    assert stub.finished.wait(5.0)
    time.sleep(0.05)
    (ok,), texts_ok = split(g.process(b2, None))  # worker free again, fast now: the network's result
    assert ok.meta[dl.META_METHOD] == "DL-VARNET" and not texts_ok
    assert dict(g.counts) == {"late": 1, "busy": 1, "dl": 1}
    (summary,) = [str(t) for t, _ in g.close()]
    assert "2 of 3 slices" in summary and "1 busy" in summary and "1 late" in summary


def test_model_unavailable_every_slice_falls_back(case, monkeypatch):
    scan, buf = case

    def missing(params, warm_up=()):
        raise FileNotFoundError("no weights for model 'nope'")

    monkeypatch.setattr(dl, "_load_model", missing)
    g = gadget(scan.header, model="nope")
    assert g.model is None and "FileNotFoundError" in g.load_error
    (out,), texts = split(g.process(buf, None))
    assert out.meta[dl.META_METHOD].startswith("GRAPPA R=4x1 (fallback: model unavailable (FileNotFoundError")
    assert len(texts) == 1


def test_failing_fallback_still_gives_an_image(case, monkeypatch):
    """Irregular sampling breaks GRAPPA too: the zero-filled virtual coils go on, with an ERROR text."""
    scan, buf = case
    with_stub(monkeypatch, Stub(error=RuntimeError("boom")))
    sampled = buf.sampled.copy()
    sampled[0, [4, 8, 20]] = False  # no regular lattice any more
    irregular = ReconBuffer(**{**buf.__dict__, "sampled": sampled, "data": buf.data * sampled[None, :, :, None]})
    (out,), texts = split(gadget(scan.header).process(irregular, None))
    assert out.history[-1] == "ZERO-FILLED" and out.data.shape == (8, 1, 64, 64)
    assert out.meta[dl.META_METHOD] == "ZERO-FILLED (fallback: inference error (RuntimeError: boom))"
    assert [t[:8] for t in texts] == ["WARNING ", "ERROR   "] and "GRAPPA fallback failed" in texts[1]


def test_no_calibration_region_falls_back(case, tiny):
    scan, buf = case
    no_ref = ReconBuffer(**{**buf.__dict__, "reference": None, "reference_sampled": None})
    (out,), texts = split(gadget(scan.header).process(no_ref, None))
    assert "no calibration region" in out.meta[dl.META_FALLBACK]
    assert any("no calibration region" in t for t in texts)


def test_loader_uses_the_shared_engine_cache(tiny_weights, net):
    inference.clear_cache()
    params = DLRecon.Params(model=str(tiny_weights), device="cpu", backends=["eager"], warmup_shapes=[(16, 32, 32)])
    m1 = dl._load_model(params)
    m2 = dl._load_model(params)
    assert m1 is m2 and m1.backend == "eager"
    stats = dl.model_cache_stats()
    assert (stats.loads, stats.hits) == (1, 1)
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((1, 8, 32, 32)) + 1j * rng.standard_normal((1, 8, 32, 32))).astype(np.complex64)
    mask = np.zeros((1, 1, 32, 1), np.float32)
    mask[:, :, ::4] = 1
    mask[:, :, 12:20] = 1
    acs = np.zeros_like(mask)
    acs[:, :, 12:20] = 1
    with torch.inference_mode():
        direct = net(torch.from_numpy(k * mask), torch.from_numpy(mask), torch.from_numpy(acs)).numpy()
    assert np.allclose(m1.run(k * mask, mask, acs), direct, rtol=1e-5, atol=1e-6)
    assert "shapes [(1, 8, 32, 32)]" in DLRecon.warm_up(params)  # coils capped at virtual_coils
    assert (1, 8, 32, 32) in m1.warmed_shapes and dl.model_cache_stats().loads == 1
    inference.clear_cache()


def test_warm_up_without_torch_is_skipped(monkeypatch):
    real = dl.importlib.util.find_spec
    monkeypatch.setattr(dl.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setattr(dl, "_load_model", lambda params, warm_up=(): pytest.fail("loaded without torch"))
    assert DLRecon.warm_up(DLRecon.Params()) == "skipped: torch not installed"


def test_model_names_and_paths():
    assert dl.model_spec("varnet_mni152") == "varnet_mni152"  # shipped: the engine checks its sha256
    with pytest.raises(OSError):
        dl.model_spec("/no/such/dir/absent.pt")
    assert list(dl.DEFAULT_BACKENDS) == list(inference.DEFAULT_PREFERENCE)
    assert DLRecon.Params().backends == list(inference.DEFAULT_PREFERENCE)


def test_config_mirrors_cs_chain():
    dl_stages = validate_chain(load_chain(DL_CONFIG))
    cs_stages = validate_chain(load_chain(CS_CONFIG))
    assert [s.name for s in dl_stages] == [s.name if s.name != "cs" else "dl_recon" for s in cs_stages]
    stage = next(s for s in dl_stages if s.name == "dl_recon")
    assert stage.cls is DLRecon and stage.params.budget_ms == 500 and stage.params.fallback == "grappa"
    assert load_chain(DL_CONFIG).budget_ms == 1000


def test_helpers():
    lines = np.zeros(32, bool)
    lines[[0, 4, 8, 12, 13, 14, 15, 16, 17, 18, 20, 24]] = True
    run = dl.calibration_run(lines, 16)
    assert np.flatnonzero(run).tolist() == list(range(12, 19))
    assert np.flatnonzero(dl.calibration_run(lines, 2)).tolist() == list(range(12, 19))  # centre unknown: longest run
    assert dl.detect_acceleration(np.arange(64) % 4 == 1) == 4
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((8, 64, 48)) + 1j * rng.standard_normal((8, 64, 48))).astype(np.complex64)
    acs = np.abs(np.arange(64) - 32) < 6
    assert dl.input_scale(k, acs) == pytest.approx(input_scale(k, acs), rel=1e-5)  # the training's scale
    assert dl.grappa_kernel_ky(4, 12) == 3 and dl.grappa_kernel_ky(4, 24) == 4 and dl.grappa_kernel_ky(2, 5) == 3 and dl.grappa_kernel_ky(2, 4) == 2


def test_trained_weights_beat_zero_filled():
    """Loose: the trained network is better than zero filling (its quality is evaluated elsewhere),
    and the SENSE step makes it better still on this slice."""
    inference.clear_cache()
    scan = simulate_scan(matrix=128, slices=1, coils=16, acceleration=4, acs_lines=12, snr=40, seed=11, noise_samples=0)
    (buf,) = buffers_of(scan)
    truth = truth_of(scan)
    errors = {}
    for refine in (False, True):
        g = gadget(scan.header, budget_ms=None, device="cpu", refine=refine)
        (out,), texts = split(g.process(buf, None))
        assert out.meta[dl.META_METHOD] == "DL-VARNET", texts
        errors[refine] = score(rss_image(out.data), truth)
    assert errors[False] < 0.5 * score(rss_image(buf.data), truth)
    assert errors[True] < errors[False], errors
    inference.clear_cache()


def test_refine_skipped_without_coil_maps(case, tiny):
    """A calibration block narrower than the ESPIRiT kernel (6): the network's image stands, and says so."""
    scan, buf = case
    ref = buf.reference_sampled.copy()
    centre = np.flatnonzero(ref[0])
    ref[0, :] = False
    ref[0, centre[len(centre) // 2 - 2 : len(centre) // 2 + 2]] = True  # 4 lines: enough for the network, not ESPIRiT
    narrow = ReconBuffer(**{**buf.__dict__, "reference_sampled": ref, "sampled": buf.sampled & ~ref})
    g = gadget(scan.header, budget_ms=None)
    (out,), _ = split(g.process(narrow, None))
    assert out.meta[dl.META_METHOD] == "DL-VARNET" and "SENSE-DC" not in out.history
    assert out.meta[dl.META_REFINE].startswith("skipped: no coil maps")
