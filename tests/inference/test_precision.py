"""Reduced precision against fp32 on the CPU: autocast convolutions, FFTs kept complex64.

Tolerances are NRMSE of the output k-space vs the fp32 eager output, for the tiny random
VarNet on the phantom (seed 0). Measured on an AMD EPYC (AVX512-BF16), torch 2.13:
bf16 2.7e-3 (2.6e-3 .. 8.5e-3 over seeds 0-2 and 32/64 matrices), fp16 3.1e-4 (up to 1.0e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_helpers import fresh_cache, nrmse, phantom_inputs, reference_output, tiny_spec  # noqa: F401 (fixtures)

from inline.inference import get_model


TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_stays_close_to_fp32(tiny_spec, precision):
    k, mask, acs = phantom_inputs(coils=8, n=64)
    model = get_model(tiny_spec, preference=["eager"], device="cpu", precision=precision)
    out = model.run(k, mask, acs)
    assert out.dtype == np.complex64 and model.precision == precision
    reference = reference_output(tiny_spec, k, mask, acs)
    error = nrmse(out, reference)
    assert 0 < error < TOLERANCE[precision], f"{precision} NRMSE {error:.2e}"


def test_the_autocast_outputs_stay_complex64(tiny_spec):
    """Convolutions run in bf16 but the de-normalised U-Net output, the FFTs and data
    consistency stay float32/complex64 (no dtype edits to the model were needed)."""
    from inline.inference import load_network

    net, _ = load_network(tiny_spec)
    k, mask, acs = (torch.from_numpy(a) for a in phantom_inputs())
    seen = []
    net.cascades[0].refine.unet.out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(k, mask, acs)
        refined = net.cascades[0].refine(torch.complex(k[:, 0].real, k[:, 0].imag))
    assert seen[0] == torch.bfloat16 and out.dtype == torch.complex64 and refined.dtype == torch.complex64
