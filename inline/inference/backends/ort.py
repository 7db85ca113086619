"""ONNX Runtime: the network exported once per (ky, kx) to the on-disk cache, run by ORT.

The export is :class:`models.varnet.RealViewVarNet` (k-space as a trailing real/imaginary
axis: ONNX has no complex tensors) through ``torch.onnx.export(dynamo=True)``
(https://pytorch.org/docs/stable/onnx_export.html), opset 18; batch and coils are dynamic
axes, ky and kx are fixed because the exporter cannot lower ``torch.roll`` (the centred
FFT's shift) with symbolic shifts. Files: ``<cache>/onnx/<onnx_cache_key>.onnx``.

Providers: ``CUDAExecutionProvider`` for a CUDA device (``onnxruntime-gpu``; inputs and
outputs bound to the torch tensors' device memory with I/O binding, no host copies), else
``CPUExecutionProvider``. fp32 only.

Measured on the CPU (AMD EPYC, 2 cores shared with a training run; 256x256, 8 coils, 8
cascades, one thread each): ORT 1.2-1.35 s per slice vs eager 0.28 s (~4.5x slower; the FFTs
become ONNX ``DFT`` ops). Tried: opset 18 vs 20 (no consistent difference), graph
optimisation levels basic/extended/all (within noise), intra-op threads 0/1/2 (1 best under
contention). Prefer ``eager`` on the CPU; ORT is here for GPU hosts and portability.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
import warnings
from typing import Any, ClassVar

from inline.inference.backends.base import Backend, BuildContext
from inline.inference.diskcache import atomic_write, onnx_cache_key

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAMES = ("kspace", "mask", "acs_mask")


def export_onnx(net: Any, path: Any, coils: int, ky: int, kx: int) -> None:
    """Export ``RealViewVarNet(net)`` (on the CPU) for k-space ``(batch, coils, ky, kx)`` with
    dynamic batch and coils to ``path``."""
    import torch

    from models.varnet import RealViewVarNet

    wrapper = RealViewVarNet(net).eval()
    example = (
        torch.zeros(1, coils, ky, kx, 2),
        torch.ones(1, 1, ky, 1),
        torch.ones(1, 1, ky, 1),
    )
    batch, coil_dim = torch.export.Dim("batch", min=1, max=256), torch.export.Dim("coils", min=1, max=256)
    dynamic = {"kspace": {0: batch, 1: coil_dim}, "mask": {0: batch}, "acs_mask": {0: batch}}
    with warnings.catch_warnings():
        # the masks share the batch axis by design; the exporter warns that it keeps one name
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(
            wrapper, example, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
            input_names=list(INPUT_NAMES), output_names=["kspace_out"], verbose=False,
        )  # fmt: skip
    atomic_write(path, lambda tmp: program.save(str(tmp)))


class OrtRunner:
    """One ORT session per (ky, kx), made (exported or read from the cache) on first use."""

    thread_safe = True  # InferenceSession.run is thread-safe; session creation is locked

    def __init__(self, net: Any, ctx: BuildContext) -> None:
        import torch

        self.net = net.cpu()
        self.ctx = ctx
        self.sessions: dict[tuple[int, int], Any] = {}
        self.lock = threading.Lock()
        self.exports = 0
        self.exporter = f"torch-{torch.__version__}"

    def path_for(self, ky: int, kx: int) -> Any:
        return self.ctx.cache_dir / "onnx" / f"{onnx_cache_key(self.ctx.checksum, ky, kx, OPSET, self.exporter)}.onnx"

    def session(self, coils: int, ky: int, kx: int) -> Any:
        with self.lock:
            if (ky, kx) in self.sessions:
                return self.sessions[(ky, kx)]
            import onnxruntime as ort

            path = self.path_for(ky, kx)
            if path.is_file():
                log.info("%s: ONNX export for %dx%d from cache %s", self.ctx.model_name, ky, kx, path)
            else:
                t0 = time.perf_counter()
                export_onnx(self.net, path, coils, ky, kx)
                self.exports += 1
                log.info("%s: exported ONNX for %dx%d in %.1f s to %s", self.ctx.model_name, ky, kx, time.perf_counter() - t0, path)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self.ctx.intra_op_threads
            if self.ctx.device.type == "cuda":
                providers = [("CUDAExecutionProvider", {"device_id": self.ctx.device.index or 0})]
            else:
                providers = ["CPUExecutionProvider"]
            sess = ort.InferenceSession(str(path), options, providers=providers)
            self.sessions[(ky, kx)] = sess
            return sess

    def __call__(self, kspace: Any, mask: Any, acs_mask: Any) -> Any:
        import torch

        batch, coils, ky, kx = kspace.shape
        sess = self.session(coils, ky, kx)
        k_real = torch.view_as_real(kspace.resolve_conj()).contiguous()
        inputs = dict(zip(INPUT_NAMES, (k_real, mask.contiguous(), acs_mask.contiguous())))
        out_name = sess.get_outputs()[0].name
        if self.ctx.device.type == "cuda":
            out = torch.empty_like(k_real)
            binding = sess.io_binding()
            index = self.ctx.device.index or 0
            for name, t in inputs.items():
                binding.bind_input(name, "cuda", index, _np_float32(), tuple(t.shape), t.data_ptr())
            binding.bind_output(out_name, "cuda", index, _np_float32(), tuple(out.shape), out.data_ptr())
            torch.cuda.current_stream(self.ctx.device).synchronize()  # inputs written before ORT's stream reads them
            sess.run_with_iobinding(binding)
        else:
            feeds = {name: t.numpy() for name, t in inputs.items()}
            out = torch.from_numpy(sess.run([out_name], feeds)[0])
        return torch.view_as_complex(out)


def _np_float32() -> Any:
    import numpy as np

    return np.float32


class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def unavailable_reason(self, device: Any, precision: str) -> str | None:
        for module in ("onnxruntime", "onnxscript", "onnx"):
            if importlib.util.find_spec(module) is None:
                return f"{module} not installed (pip install -e '.[dl]')"
        if precision not in self.precisions:
            return f"the ONNX export is fp32 only (asked for {precision})"
        import onnxruntime as ort

        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "CUDAExecutionProvider not available (install onnxruntime-gpu: the gpu-dl extra)"
        if device.type not in ("cpu", "cuda"):
            return f"device type {device.type!r} is not supported (cpu or cuda)"
        return None

    def build(self, net: Any, ctx: BuildContext) -> OrtRunner:
        return OrtRunner(net, ctx)
