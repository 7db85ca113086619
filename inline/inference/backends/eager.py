"""PyTorch eager execution on the CPU or a CUDA device, fp32 or under ``torch.autocast``.

The reference backend: always available where PyTorch sees the device. On the CPU, bf16
uses oneDNN's AVX512-BF16 kernels where the CPU has them (measured 256x256, 8 coils, 8
cascades on an AMD EPYC: ~0.24 s vs ~0.28 s fp32 at one thread); fp16 has no fast CPU
kernels and is emulated (tens of seconds per slice): use it on GPUs only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from inline.inference.backends.base import Backend, BuildContext, autocast, device_reason


class EagerRunner:
    """``net`` moved to ``device``, called in inference mode under autocast for fp16/bf16."""

    thread_safe = True  # modules in eval/inference mode hold no per-call state

    def __init__(self, net: Any, device: Any, precision: str) -> None:
        self.net = net.to(device)
        self.device, self.precision = device, precision

    def __call__(self, kspace: Any, mask: Any, acs_mask: Any) -> Any:
        import torch

        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.net(kspace, mask, acs_mask)


class EagerBackend(Backend):
    name: ClassVar[str] = "eager"

    def unavailable_reason(self, device: Any, precision: str) -> str | None:
        return device_reason(device, precision)

    def build(self, net: Any, ctx: BuildContext) -> EagerRunner:
        return EagerRunner(net, ctx.device, ctx.precision)
