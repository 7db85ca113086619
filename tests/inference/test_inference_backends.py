"""Backends against the plain PyTorch model: eager, ONNX Runtime (with its on-disk export cache),
torch.compile; array kinds in and out (NumPy, torch, CuPy through DLPack); input checks."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from inference_helpers import fresh_cache, nrmse, phantom_inputs, reference_output, tiny_spec  # noqa: F401 (fixtures)

from inline.backend import cupy_available
from inline.inference import BACKENDS, get_model


#: ONNX Runtime vs eager, both fp32: measured 2-4e-6 (different FFT and convolution kernels)
ORT_TOLERANCE = 1e-5


def test_eager_numpy_in_numpy_out_matches_the_model(tiny_spec):
    k, mask, acs = phantom_inputs(batch=2)
    model = get_model(tiny_spec, preference=["eager"], device="cpu")
    out = model.run(k, mask, acs)
    assert isinstance(out, np.ndarray) and out.dtype == np.complex64 and out.shape == k.shape
    np.testing.assert_allclose(out, reference_output(tiny_spec, k, mask, acs), rtol=0, atol=1e-6)
    assert model.backend == "eager" and str(model.device) == "cpu"


def test_torch_tensors_in_give_torch_tensors_out(tiny_spec):
    k, mask, acs = phantom_inputs()
    model = get_model(tiny_spec, preference=["eager"], device="cpu")
    out = model.run(torch.from_numpy(k), torch.from_numpy(mask), torch.from_numpy(acs))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.complex64
    np.testing.assert_array_equal(out.numpy(), model.run(k, mask, acs))


def test_non_contiguous_and_reversed_numpy_views_are_accepted(tiny_spec):
    k, mask, acs = phantom_inputs()
    model = get_model(tiny_spec, preference=["eager"], device="cpu")
    flipped = k[:, ::-1]  # negative strides: torch.from_numpy refuses them, the engine copies
    np.testing.assert_allclose(model.run(flipped, mask, acs), model.run(np.ascontiguousarray(flipped), mask, acs), atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda k, m, a: (k[0], m, a), r"kspace must be \(batch, coils, ky, kx\) complex64; got shape \(4, 32, 32\)"),
        (lambda k, m, a: (k.astype(np.complex128), m, a), "got shape .* dtype complex128"),
        (lambda k, m, a: (np.abs(k), m, a), "dtype float32"),
        (lambda k, m, a: (k, m[..., :16, :], a), r"mask must be \(batch, 1, ky, 1\) = \(1, 1, 32, 1\) float32 .* got shape \(1, 1, 16, 1\)"),
        (lambda k, m, a: (k, m, a.astype(np.float64)), r"acs_mask must be \(batch, 1, ky, 1\) = \(1, 1, 32, 1\) float32 .* dtype float64"),
        (lambda k, m, a: (k, m.reshape(1, 32), a), r"mask must be .* got shape \(1, 32\)"),
    ],
)
def test_wrong_shapes_and_dtypes_say_what_is_expected(tiny_spec, change, message):
    model = get_model(tiny_spec, preference=["eager"], device="cpu")
    with pytest.raises(ValueError, match=message):
        model.run(*change(*phantom_inputs()))


def test_other_types_are_type_errors(tiny_spec):
    k, mask, acs = phantom_inputs()
    model = get_model(tiny_spec, preference=["eager"], device="cpu")
    with pytest.raises(TypeError, match="mask: expected a numpy or cupy array or a torch tensor, got list"):
        model.run(k, mask.tolist(), acs)


def test_onnxruntime_matches_eager_and_exports_once_per_matrix(tiny_spec, fresh_cache):
    model = get_model(tiny_spec, preference=["onnxruntime", "eager"], device="cpu", warm_up=[(1, 4, 32, 32)])
    assert model.backend == "onnxruntime" and model.precision == "fp32"
    exports = sorted((fresh_cache / "onnx").glob("*.onnx"))
    assert len(exports) == 1 and exports[0].name.startswith(tiny_spec.sha256[:16] + "_32x32_op18_")
    for batch, coils in [(1, 4), (2, 4), (1, 8)]:  # batch and coils are dynamic axes: no new export
        k, mask, acs = phantom_inputs(batch=batch, coils=coils)
        out = model.run(k, mask, acs)
        assert out.dtype == np.complex64 and out.shape == k.shape
        assert nrmse(out, reference_output(tiny_spec, k, mask, acs)) < ORT_TOLERANCE
    assert model.runner.exports == 1 and len(list((fresh_cache / "onnx").glob("*.onnx"))) == 1


def test_a_new_process_reads_the_export_from_disk(tiny_spec, fresh_cache, monkeypatch):
    from inline.inference import clear_cache

    get_model(tiny_spec, preference=["onnxruntime"], device="cpu", warm_up=[(1, 4, 32, 32)])
    clear_cache()  # what a server restart does to the in-process cache

    def no_export(*args, **kwargs):
        raise AssertionError("the cached ONNX file should have been used")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    model = get_model(tiny_spec, preference=["onnxruntime"], device="cpu", warm_up=[(1, 4, 32, 32)])
    assert model.backend == "onnxruntime" and model.runner.exports == 0
    k, mask, acs = phantom_inputs()
    assert nrmse(model.run(k, mask, acs), reference_output(tiny_spec, k, mask, acs)) < ORT_TOLERANCE


def test_onnxruntime_is_fp32_only():
    reason = BACKENDS["onnxruntime"].unavailable_reason(torch.device("cpu"), "bf16")
    assert reason is not None and "fp32 only" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compile backend is available")
def test_compile_is_unavailable_on_the_cpu_and_says_why():
    reason = BACKENDS["compile"].unavailable_reason(torch.device("cpu"), "fp32")
    assert "CUDA graphs" in reason and "need a GPU" in reason


@pytest.mark.slow
def test_the_compiled_runner_matches_eager_on_the_cpu(tiny_spec):
    """The compile backend's runner (Inductor without CUDA graphs here): same numbers, fresh
    buffers, callable from any thread."""
    from inline.inference import load_network
    from inline.inference.backends.compiled import CompiledRunner

    net, _ = load_network(tiny_spec)
    runner = CompiledRunner(net, torch.device("cpu"), "fp32", mode="default")
    k, mask, acs = (torch.from_numpy(a) for a in phantom_inputs())
    first = runner(k, mask, acs)
    threads = [threading.Thread(target=lambda: results.append(runner(k, mask, acs))) for _ in range(2)]
    results: list = []
    for t in threads:  # sessions on other threads reach the same compiled function through its worker
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and len({first.data_ptr(), *(r.data_ptr() for r in results)}) == 3
    reference = reference_output(tiny_spec, *phantom_inputs())
    assert all(nrmse(r.numpy(), reference) < 1e-5 for r in (first, *results))


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device (gpu extra on a GPU host)")
def test_cupy_in_cupy_out_through_dlpack_on_the_gpu(tiny_spec):
    import cupy as cp

    k, mask, acs = phantom_inputs(batch=2)
    model = get_model(tiny_spec, preference=["eager"], device="cuda")
    out = model.run(cp.asarray(k), cp.asarray(mask), cp.asarray(acs))
    assert isinstance(out, cp.ndarray) and out.dtype == cp.complex64 and out.device.id == model.device.index
    assert nrmse(cp.asnumpy(out), reference_output(tiny_spec, k, mask, acs)) < 1e-4
    # DLPack shares memory: a tensor made from a CuPy array points at the same device buffer
    from inline.inference.arrays import to_torch

    x = cp.asarray(k)
    assert to_torch(x, model.device).data_ptr() == x.data.ptr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_with_cuda_graphs_matches_eager_on_the_gpu(tiny_spec):
    k, mask, acs = phantom_inputs()
    model = get_model(tiny_spec, preference=["compile"], device="cuda", warm_up=[k.shape])
    assert model.backend == "compile"
    first = model.run(k, mask, acs)
    second = model.run(*phantom_inputs(seed=1))
    assert nrmse(first, reference_output(tiny_spec, k, mask, acs)) < 1e-4  # not overwritten by the second replay
    assert not np.array_equal(first, second)
