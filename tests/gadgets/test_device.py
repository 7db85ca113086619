"""Device transfer gadgets and NumPy/CuPy parity of the Cartesian path (FFT + coil combination)."""

import numpy as np
import pytest
from chain_helpers import context, make_header

from gadgets.coil_combine import CoilCombine
from gadgets.device import ToDevice, ToHost
from gadgets.fft_recon import FFTRecon
from inline.backend import BackendUnavailable, cupy_available, is_cupy
from inline.buffers import AcquisitionIndex, EncodingInfo, ReconBuffer


def buffer(rng, coils=4, ny=32, nx=32) -> ReconBuffer:
    header = make_header()
    enc = EncodingInfo((nx, ny, 1), (256.0, 256.0, 5.0), (nx, ny, 1), (256.0, 256.0, 5.0), ny // 2, 0, ny - 1, 0)
    k = (rng.standard_normal((coils, 1, ny, nx)) + 1j * rng.standard_normal((coils, 1, ny, nx))).astype(np.complex64)
    return ReconBuffer(k, np.ones((1, ny), bool), AcquisitionIndex(), enc, None, 256.0), header


def recon(item, header):
    ctx = context(header)
    img = FFTRecon(ctx).apply(item)
    return CoilCombine(ctx, CoilCombine.Params(method="walsh", walsh_kernel_size=5)).apply(img), CoilCombine(ctx).apply(img)


@pytest.mark.skipif(cupy_available(), reason="this host has a GPU: the parity test covers ToDevice")
def test_without_gpu_to_device_passes_through_or_fails_when_required():
    item, header = buffer(np.random.default_rng(0))
    gadget = ToDevice(context(header))
    assert gadget.apply(item) is item
    with pytest.raises(BackendUnavailable, match="required GPU not available"):
        ToDevice(context(header), ToDevice.Params(required=True))
    assert ToHost(context(header)).apply(item).data is item.data


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device (gpu extra on a GPU host)")
def test_numpy_cupy_parity_fft_and_combination():
    item, header = buffer(np.random.default_rng(1))
    walsh_cpu, rss_cpu = recon(item, header)
    on_gpu = ToDevice(context(header)).apply(item)
    assert is_cupy(on_gpu.data) and is_cupy(on_gpu.sampled)
    walsh_gpu, rss_gpu = recon(on_gpu, header)
    back = ToHost(context(header))
    np.testing.assert_allclose(back.apply(rss_gpu).data, rss_cpu.data, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.abs(back.apply(walsh_gpu).data), np.abs(walsh_cpu.data), rtol=1e-3, atol=1e-4)


def test_gpu_chain_runs_on_the_cpu_without_a_gpu(small_scan):
    """configs/default_gpu.yaml gives the default chain's images bit for bit on a CPU-only host."""
    from inline.config import load_chain
    from inline.mrdfile import read_scan
    from inline.offline import run_chain

    if cupy_available():
        pytest.skip("this host has a GPU: images then agree within tolerance, checked by the parity test")
    scan = read_scan(small_scan)
    ref = run_chain(load_chain("default"), scan).images
    gpu = run_chain(load_chain("default_gpu"), scan).images
    assert len(ref) == len(gpu) == 2
    for a, b in zip(ref, gpu):
        np.testing.assert_array_equal(a.data, b.data)
