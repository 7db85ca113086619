"""Keys of the on-disk export/engine cache (pure), shape ranges, Torch-TensorRT settings, and
the TensorRT backend itself where torch_tensorrt and a GPU are present."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from inference_helpers import fresh_cache, nrmse, phantom_inputs, reference_output, tiny_spec  # noqa: F401 (fixtures)

from inline.inference import BACKENDS, ShapeRange, clear_cache, get_model
from inline.inference.backends.tensorrt import precision_kwargs
from inline.inference.diskcache import atomic_write, cache_root, engine_cache_key, onnx_cache_key


SHA = "ab" * 32
RANGE = ShapeRange((1, 8, 256, 256), (1, 8, 256, 256), (4, 32, 256, 256))
BASE = dict(checksum=SHA, shape_range=RANGE, precision="fp16", gpu_name="NVIDIA H100 80GB HBM3 sm90",
            tensorrt_version="10.9.0", torch_tensorrt_version="2.7.0")  # fmt: skip


def test_engine_key_is_deterministic_and_file_name_safe():
    key = engine_cache_key(**BASE)
    assert key == engine_cache_key(**dict(BASE))
    assert re.fullmatch(r"[0-9a-z_]+", key) and key.startswith(SHA[:16] + "_fp16_1x8x256x256_")


@pytest.mark.parametrize(
    "field, value",
    [
        ("checksum", "cd" * 32),
        ("shape_range", ShapeRange((1, 8, 256, 256), (1, 8, 256, 256), (8, 32, 256, 256))),
        ("shape_range", ShapeRange.static((1, 8, 256, 256))),
        ("precision", "fp32"),
        ("gpu_name", "NVIDIA A100-SXM4-80GB sm80"),
        ("tensorrt_version", "10.10.0"),
        ("torch_tensorrt_version", "2.8.0"),
    ],
)
def test_every_part_of_the_engine_key_changes_it(field, value):
    assert engine_cache_key(**{**BASE, field: value}) != engine_cache_key(**BASE)


def test_onnx_key_depends_on_weights_matrix_opset_and_exporter():
    base = onnx_cache_key(SHA, 256, 256, 18, "torch-2.13.0")
    assert base == onnx_cache_key(SHA, 256, 256, 18, "torch-2.13.0") and base.startswith(SHA[:16] + "_256x256_op18_")
    others = [onnx_cache_key("cd" * 32, 256, 256, 18, "torch-2.13.0"), onnx_cache_key(SHA, 256, 192, 18, "torch-2.13.0"),
              onnx_cache_key(SHA, 256, 256, 20, "torch-2.13.0"), onnx_cache_key(SHA, 256, 256, 18, "torch-2.14.0")]  # fmt: skip
    assert len({base, *others}) == 5


def test_cache_root_prefers_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("INLINE_MODEL_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("INLINE_MODEL_CACHE")
    assert cache_root().parts[-2:] == (".cache", "inline")


def test_atomic_write_leaves_the_file_or_nothing(tmp_path):
    target = tmp_path / "sub" / "engine.ep"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"engine"))
    assert target.read_bytes() == b"engine"

    def half_written(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "sub" / "other.ep", half_written)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["engine.ep"]


def test_shape_ranges_are_ordered_and_know_their_members():
    assert RANGE.contains((2, 16, 256, 256)) and not RANGE.contains((1, 8, 256, 192))
    assert ShapeRange.static((1, 8, 64, 64)).contains((1, 8, 64, 64))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeRange((1, 8, 256, 256), (1, 4, 256, 256), (1, 8, 256, 256))
    with pytest.raises(ValueError, match="four positive ints"):
        ShapeRange.static((8, 256, 256))


def test_precision_settings_follow_the_installed_torch_tensorrt():
    old = {"enabled_precisions", "use_explicit_typing"}  # before rule-based autocast
    new = {"enabled_precisions", "use_explicit_typing", "enable_autocast", "low_precision_type"}
    assert precision_kwargs("fp32", old) == {"enabled_precisions": {torch.float32}}
    assert precision_kwargs("fp16", old) == {"enabled_precisions": {torch.float32, torch.float16}, "use_explicit_typing": False}
    assert precision_kwargs("bf16", {"enabled_precisions"}) == {"enabled_precisions": {torch.float32, torch.bfloat16}}
    assert precision_kwargs("fp32", new) == {}
    assert precision_kwargs("fp16", new) == {"use_explicit_typing": True, "enable_autocast": True, "low_precision_type": torch.float16}


HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None


@pytest.mark.skipif(HAS_TORCH_TENSORRT, reason="torch_tensorrt is installed here")
def test_without_torch_tensorrt_the_backend_says_so():
    assert BACKENDS["tensorrt"].unavailable_reason(torch.device("cuda"), "fp16") == "torch_tensorrt not installed"


def _require_tensorrt() -> None:
    if not HAS_TORCH_TENSORRT:
        pytest.skip("torch_tensorrt not installed: TensorRT backend untested here")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device: TensorRT backend untested here")


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 1e-2)])
def test_tensorrt_matches_eager_and_reuses_its_engine(tiny_spec, fresh_cache, precision, tolerance):
    _require_tensorrt()
    k, mask, acs = phantom_inputs()
    model = get_model(tiny_spec, preference=["tensorrt"], device="cuda", precision=precision, warm_up=[k.shape])
    assert model.backend == "tensorrt"
    out = model.run(k, mask, acs)
    assert out.dtype == np.complex64 and nrmse(out, reference_output(tiny_spec, k, mask, acs)) < tolerance
    engines = sorted((fresh_cache / "tensorrt").glob("*.ep"))
    assert len(engines) == 1
    clear_cache()
    again = get_model(tiny_spec, preference=["tensorrt"], device="cuda", precision=precision, warm_up=[k.shape])
    assert sorted((fresh_cache / "tensorrt").glob("*.ep")) == engines
    np.testing.assert_allclose(again.run(k, mask, acs), out, atol=1e-4 * np.abs(out).max())
