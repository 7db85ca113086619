"""The process-wide model cache: one load per model/backend/device/precision, shared by threads;
backend choice by preference with logged reasons; warm-up once per shape."""

from __future__ import annotations

import importlib.util
import logging
import threading

import numpy as np
import pytest
import torch
from inference_helpers import fresh_cache, phantom_inputs, tiny_spec  # noqa: F401 (fixtures)

from inline.inference import BACKENDS, NoBackendAvailable, cache_stats, get_model
from inline.inference.backends.eager import EagerRunner


HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None


def test_a_second_request_is_a_cache_hit(tiny_spec):
    first = get_model(tiny_spec, preference=["eager"], device="cpu")
    second = get_model(tiny_spec, preference=["eager"], device="cpu")
    assert second is first
    stats = cache_stats()
    assert (stats.hits, stats.loads, stats.entries) == (1, 1, 1)


def test_precision_and_backend_are_part_of_the_key(tiny_spec):
    fp32 = get_model(tiny_spec, preference=["eager"], device="cpu", precision="fp32")
    bf16 = get_model(tiny_spec, preference=["eager"], device="cpu", precision="bf16")
    assert fp32 is not bf16 and (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert cache_stats().loads == 2
    assert get_model(tiny_spec, preference=["eager"], device="cpu", precision="bf16") is bf16


def test_sessions_on_many_threads_share_one_load(tiny_spec):
    barrier = threading.Barrier(8)
    got: list = []

    def session():
        barrier.wait()
        got.append(get_model(tiny_spec, preference=["eager"], device="cpu"))

    threads = [threading.Thread(target=session) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(m is got[0] for m in got)
    assert (cache_stats().loads, cache_stats().hits) == (1, 7)


def test_concurrent_runs_give_the_sequential_results(tiny_spec):
    model = get_model(tiny_spec, preference=["eager"], device="cpu")
    inputs = [phantom_inputs(seed=s) for s in range(4)]
    expected = [model.run(*i) for i in inputs]
    results: dict[int, np.ndarray] = {}

    def session(i):
        results[i] = model.run(*inputs[i])

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_array_equal(results[i], expected[i])


class CountingRunner(EagerRunner):
    """An eager runner that counts calls (warm-up must run each shape once)."""

    thread_safe = False

    def __init__(self, *args):
        super().__init__(*args)
        self.shapes: list = []

    def __call__(self, kspace, mask, acs_mask):
        self.shapes.append(tuple(kspace.shape))
        return super().__call__(kspace, mask, acs_mask)


def test_warm_up_runs_each_declared_shape_once(tiny_spec, monkeypatch):
    monkeypatch.setattr(BACKENDS["eager"], "build", lambda net, ctx: CountingRunner(net, ctx.device, ctx.precision))
    model = get_model(tiny_spec, preference=["eager"], device="cpu", warm_up=[(1, 4, 32, 32), (2, 4, 32, 48)])
    assert model.runner.shapes == [(1, 4, 32, 32), (2, 4, 32, 48)]
    assert set(model.warmed_shapes) == {(1, 4, 32, 32), (2, 4, 32, 48)}
    # a second session declaring an overlapping set warms up only the new shape
    again = get_model(tiny_spec, preference=["eager"], device="cpu", warm_up=[(1, 4, 32, 32), (1, 8, 32, 32)])
    assert again is model and model.runner.shapes[2:] == [(1, 8, 32, 32)]
    assert model.warm_up([(1, 4, 32, 32)]) == {}


def test_malformed_warm_up_shapes_are_refused(tiny_spec):
    with pytest.raises(ValueError, match="batch, coils, ky, kx"):
        get_model(tiny_spec, preference=["eager"], device="cpu", warm_up=[(4, 32, 32)])
    assert cache_stats().failures == 0


@pytest.mark.skipif(HAS_TORCH_TENSORRT or torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_unavailable_backends_are_skipped_with_logged_reasons(tiny_spec, caplog):
    with caplog.at_level(logging.INFO, logger="inline.inference"):
        model = get_model(tiny_spec, preference=["tensorrt", "compile", "eager"], device="cpu")
    assert model.backend == "eager"
    assert "torch_tensorrt not installed" in caplog.text
    assert "CUDA graphs" in caplog.text
    assert "inference: tiny on backend eager" in caplog.text


@pytest.mark.skipif(HAS_TORCH_TENSORRT or torch.cuda.is_available(), reason="checks the CPU-only error")
def test_no_available_backend_lists_every_reason(tiny_spec):
    with pytest.raises(NoBackendAvailable) as info:
        get_model(tiny_spec, preference=["tensorrt", "compile"], device="cpu")
    assert "tensorrt: torch_tensorrt not installed" in str(info.value) and "compile: " in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_request_without_cuda_says_so(tiny_spec):
    with pytest.raises(NoBackendAvailable, match="CUDA is not available"):
        get_model(tiny_spec, preference=["eager"], device="cuda")


def test_a_failing_build_falls_back_and_is_not_retried(tiny_spec, monkeypatch, caplog):
    calls = []

    def broken(net, ctx):
        calls.append(ctx)
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(BACKENDS["onnxruntime"], "build", broken)
    with caplog.at_level(logging.WARNING, logger="inline.inference"):
        model = get_model(tiny_spec, preference=["onnxruntime", "eager"], device="cpu")
    assert model.backend == "eager" and "exporter exploded" in caplog.text
    assert get_model(tiny_spec, preference=["onnxruntime", "eager"], device="cpu") is model
    assert len(calls) == 1 and cache_stats().failures == 1


def test_a_failing_warm_up_falls_back_to_the_next_backend(tiny_spec, monkeypatch):
    class Broken(EagerRunner):
        def __call__(self, *args):
            raise RuntimeError("engine build failed")

    monkeypatch.setattr(BACKENDS["onnxruntime"], "build", lambda net, ctx: Broken(net, ctx.device, ctx.precision))
    model = get_model(tiny_spec, preference=["onnxruntime", "eager"], device="cpu", warm_up=[(1, 4, 32, 32)])
    assert model.backend == "eager" and model.warmed_shapes == ((1, 4, 32, 32),)


def test_configuration_errors_are_value_errors(tiny_spec):
    with pytest.raises(ValueError, match="unknown inference backend"):
        get_model(tiny_spec, preference=["tensorflow", "eager"], device="cpu")
    with pytest.raises(ValueError, match="unknown inference backend"):
        get_model(tiny_spec, preference=[], device="cpu")
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        get_model(tiny_spec, preference=["eager"], device="cpu", precision="int8")


def test_info_names_what_image_meta_should_record(tiny_spec):
    model = get_model(tiny_spec, preference=["eager"], device="cpu", precision="bf16")
    assert model.info() == {"model": "tiny", "sha256": tiny_spec.sha256, "backend": "eager", "device": "cpu", "precision": "bf16"}
    assert model.meta["steps"] == 0 and model.load_s > 0
