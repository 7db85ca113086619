"""NumPy/CuPy parity of the accelerated reconstructions: the same bodies on both backends.

Each gadget picks its array module from the buffer it receives (``inline.backend``); on a
host with CuPy and a GPU the buffer is moved with ``ToDevice`` and the result must agree
with the NumPy run within a float32 tolerance. CPU-only hosts skip these (they have no
second backend to compare with); every other test covers the NumPy path.
"""

import numpy as np
import pytest
from chain_helpers import context, payloads, run_chain

from gadgets.device import ToDevice, ToHost
from inline.backend import cupy_available
from inline.buffers import ReconBuffer
from inline.registry import lookup
from inline.simulate import simulate_scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device (gpu extra on a GPU host)"),
]


@pytest.fixture(scope="module")
def case():
    scan = simulate_scan(matrix=64, slices=1, coils=8, acceleration=3, acs_lines=20, snr=40, seed=2, noise_samples=0)
    ctx = context(scan.header)
    chain = [lookup(n)(ctx) for n in ("RemoveReadoutOversampling", "AcquisitionAccumulateTrigger")]
    (buf,) = payloads(run_chain(chain, scan.acquisitions), ReconBuffer)
    return scan, buf


@pytest.mark.parametrize("gadget", ["GRAPPA", "SENSE", "CompressedSensing", "PartialFourier", "FFTRecon"])
def test_same_result_on_numpy_and_cupy(case, gadget):
    scan, buf = case
    ctx = context(scan.header)
    (cpu,) = payloads(run_chain([lookup(gadget)(ctx)], [buf]))
    (gpu,) = payloads(run_chain([ToDevice(ctx), lookup(gadget)(ctx), ToHost(ctx)], [buf]))
    np.testing.assert_allclose(np.asarray(gpu.data), np.asarray(cpu.data), rtol=1e-3, atol=1e-4 * float(np.abs(cpu.data).max()))
