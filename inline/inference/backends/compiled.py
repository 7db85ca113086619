"""``torch.compile(mode="reduce-overhead")``: Inductor kernels replayed as CUDA graphs, GPU only.

https://pytorch.org/docs/stable/generated/torch.compile.html ("reduce-overhead" uses CUDA
graphs). Each new input shape is compiled and recorded once (the warm-up does it); a replay
writes into the graph's static output buffers, so results are cloned before they are
returned; each call starts a new CUDA-graph step (``torch.compiler.cudagraph_mark_step_begin``);
all calls run on one worker thread (see :class:`CompiledRunner`).

Unavailable on the CPU, by measurement (AMD EPYC, 2 cores, torch 2.13, 256x256, 8 coils,
8 cascades): Inductor took 42-62 s to compile, then ran slower than eager (5.5 s vs 3.7 s
per slice under the same load): it emits no code for complex operators (FFTs, complex
products), which fall back to ATen between generated kernels, and there are no CUDA graphs
to remove launch overhead on a CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from inline.inference.backends.base import Backend, BuildContext, autocast, device_reason

CPU_REASON = (
    "torch.compile mode='reduce-overhead' replays CUDA graphs, which need a GPU "
    "(CPU Inductor measured: 42-62 s to compile, no faster than eager: complex ops are not code-generated)"
)


class CompiledRunner:
    """``torch.compile(net, mode=mode)`` on ``device``, every call on one worker thread.

    CUDA-graph trees are thread-local in PyTorch (``torch/_inductor/cudagraph_trees.py``): a
    session thread calling a compiled function would record its own graphs, paying the
    warm-up again and holding another memory pool. So warm-up and all calls run on the
    runner's single worker thread; the caller's CUDA stream and the worker's are ordered
    both ways, and results are cloned out of the graph's static buffers.
    """

    thread_safe = True  # the single worker serialises calls

    def __init__(self, net: Any, device: Any, precision: str, mode: str = "reduce-overhead") -> None:
        import torch

        self.net = net.to(device)
        self.device, self.precision = device, precision
        self.compiled = torch.compile(self.net, mode=mode, dynamic=False)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inline-compiled")

    def __call__(self, kspace: Any, mask: Any, acs_mask: Any) -> Any:
        import torch

        caller = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return self.worker.submit(self._run, kspace, mask, acs_mask, caller).result()

    def _run(self, kspace: Any, mask: Any, acs_mask: Any, caller: Any) -> Any:
        import torch

        if caller is not None:
            torch.cuda.current_stream(self.device).wait_stream(caller)
        with torch.inference_mode(), autocast(self.device, self.precision):
            torch.compiler.cudagraph_mark_step_begin()
            out = self.compiled(kspace, mask, acs_mask).clone()
        if caller is not None:
            caller.wait_stream(torch.cuda.current_stream(self.device))
            out.record_stream(caller)
        return out


class CompileBackend(Backend):
    name: ClassVar[str] = "compile"

    def unavailable_reason(self, device: Any, precision: str) -> str | None:
        if device.type != "cuda":
            return CPU_REASON
        return device_reason(device, precision)

    def build(self, net: Any, ctx: BuildContext) -> CompiledRunner:
        return CompiledRunner(net, ctx.device, ctx.precision)
