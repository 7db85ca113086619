"""TensorRT through Torch-TensorRT's dynamo frontend, engines cached on disk.

https://docs.pytorch.org/TensorRT/user_guide/compilation/dynamo_export.html and
.../runtime_performance/saving_models.html: ``torch_tensorrt.compile(module, ir="dynamo",
inputs=[torch_tensorrt.Input(min_shape, opt_shape, max_shape, dtype)])``, saved with
``torch_tensorrt.save(..., output_format="exported_program")`` and read back with
``torch.export.load(...).module()`` (importing ``torch_tensorrt`` registers its runtime ops).

The compiled module is :class:`models.varnet.RealViewVarNet` (TensorRT has no complex
tensors); operators TensorRT cannot convert (the FFTs) stay in PyTorch between engines.
An engine is built for a :class:`~inline.inference.shapes.ShapeRange`: the one declared in
the build context when a call's shape lies in it, else the call's exact shape. Engines are
keyed by weights checksum, shape range, precision, GPU and library versions
(:func:`~inline.inference.diskcache.engine_cache_key`). Reduced precision: Torch-TensorRT
>= 2.10 deprecates ``enabled_precisions`` (TensorRT 10 dropped weak typing) in favour of
``enable_autocast`` + ``low_precision_type``; :func:`precision_kwargs` picks what the
installed version takes.

``torch_tensorrt`` is imported only inside this module's functions: its absence makes the
backend unavailable ("torch_tensorrt not installed"), nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import threading
import time
from collections.abc import Collection
from typing import Any, ClassVar

from inline.inference.backends.base import Backend, BuildContext, device_reason, torch_dtype
from inline.inference.diskcache import atomic_write, engine_cache_key
from inline.inference.shapes import Shape, ShapeRange, mask_shape

log = logging.getLogger(__name__)


def precision_kwargs(precision: str, setting_names: Collection[str]) -> dict[str, Any]:
    """Keyword arguments of ``torch_tensorrt.compile`` for ``precision``, given the names of
    the installed version's ``CompilationSettings`` fields (pure; unit-tested without TensorRT)."""
    import torch

    if precision == "fp32":
        return {"enabled_precisions": {torch.float32}} if "enable_autocast" not in setting_names else {}
    dtype = torch_dtype(precision)
    if "enable_autocast" in setting_names:  # explicit typing + rule-based autocast
        return {"use_explicit_typing": True, "enable_autocast": True, "low_precision_type": dtype}
    kwargs: dict[str, Any] = {"enabled_precisions": {torch.float32, dtype}}
    if "use_explicit_typing" in setting_names:  # weak typing lets the builder pick fp16/bf16 kernels
        kwargs["use_explicit_typing"] = False
    return kwargs


def trt_inputs(shape_range: ShapeRange) -> list[Any]:
    """``torch_tensorrt.Input`` specs for RealViewVarNet's three inputs over ``shape_range``."""
    import torch
    import torch_tensorrt

    def spec(f) -> Any:
        return torch_tensorrt.Input(
            min_shape=f(shape_range.min), opt_shape=f(shape_range.opt), max_shape=f(shape_range.max), dtype=torch.float32
        )

    return [spec(lambda s: (*s, 2)), spec(mask_shape), spec(mask_shape)]


class TensorRTRunner:
    """Engines per shape range, built or loaded on first use; calls serialised (one execution context)."""

    thread_safe = False

    def __init__(self, net: Any, ctx: BuildContext) -> None:
        import tensorrt
        import torch
        import torch_tensorrt
        from torch_tensorrt.dynamo._settings import CompilationSettings

        from models.varnet import RealViewVarNet

        self.ctx = ctx
        self.wrapper = RealViewVarNet(net.to(ctx.device)).eval()
        self.modules: dict[ShapeRange, Any] = {}
        self.lock = threading.Lock()
        props = torch.cuda.get_device_properties(ctx.device)
        self.gpu = f"{props.name} sm{props.major}{props.minor}"
        self.versions = (tensorrt.__version__, torch_tensorrt.__version__)
        self.setting_names = {f.name for f in dataclasses.fields(CompilationSettings)}

    def range_for(self, shape: Shape) -> ShapeRange:
        for built in self.modules:
            if built.contains(shape):
                return built
        declared = self.ctx.shape_range
        return declared if declared is not None and declared.contains(shape) else ShapeRange.static(shape)

    def module_for(self, shape: Shape) -> Any:
        with self.lock:
            shape_range = self.range_for(shape)
            if shape_range not in self.modules:
                self.modules[shape_range] = self._build_or_load(shape_range)
            return self.modules[shape_range]

    def _build_or_load(self, shape_range: ShapeRange) -> Any:
        import torch
        import torch_tensorrt

        key = engine_cache_key(self.ctx.checksum, shape_range, self.ctx.precision, self.gpu, *self.versions)
        path = self.ctx.cache_dir / "tensorrt" / f"{key}.ep"
        if path.is_file():
            log.info("%s: TensorRT engine from cache %s", self.ctx.model_name, path)
            return torch.export.load(str(path)).module()
        t0 = time.perf_counter()
        inputs = trt_inputs(shape_range)
        module = torch_tensorrt.compile(
            self.wrapper, ir="dynamo", inputs=inputs, device=self.ctx.device,
            **precision_kwargs(self.ctx.precision, self.setting_names),
        )  # fmt: skip
        opt = shape_range.opt
        examples = [torch.zeros((*opt, 2), device=self.ctx.device)] + [torch.ones(mask_shape(opt), device=self.ctx.device)] * 2
        atomic_write(path, lambda tmp: torch_tensorrt.save(module, str(tmp), output_format="exported_program", inputs=examples))
        log.info("%s: built TensorRT engine %s in %.1f s -> %s", self.ctx.model_name, shape_range, time.perf_counter() - t0, path)
        return module

    def __call__(self, kspace: Any, mask: Any, acs_mask: Any) -> Any:
        import torch

        module = self.module_for(tuple(kspace.shape))
        with torch.inference_mode():
            out = module(torch.view_as_real(kspace.resolve_conj()).contiguous(), mask.contiguous(), acs_mask.contiguous())
        return torch.view_as_complex(out.float().contiguous())


class TensorRTBackend(Backend):
    name: ClassVar[str] = "tensorrt"

    def unavailable_reason(self, device: Any, precision: str) -> str | None:
        if importlib.util.find_spec("torch_tensorrt") is None:
            return "torch_tensorrt not installed"
        if device.type != "cuda":
            return "TensorRT needs a CUDA device"
        return device_reason(device, precision)

    def build(self, net: Any, ctx: BuildContext) -> TensorRTRunner:
        return TensorRTRunner(net, ctx)
