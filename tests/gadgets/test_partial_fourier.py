"""PartialFourier: POCS / homodyne vs zero filling on simulated and synthetic partial-Fourier data."""

from dataclasses import replace

import numpy as np
import pytest
from chain_helpers import KSPACE_BUFFERS, build_stages, centred_fft, centred_ifft, context, make_header, payloads, run_chain

from gadgets.partial_fourier import PartialFourier
from inline.buffers import AcquisitionIndex, EncodingInfo, ReconBuffer


def rss(k: np.ndarray) -> np.ndarray:
    """RSS magnitude ``(y, x)`` of the first kz of ``(coils, kz, ky, kx)`` k-space."""
    return np.sqrt((np.abs(centred_ifft(k, (2, 3))) ** 2).sum(0))[0]


def nrmse(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def high_frequency_fraction(image: np.ndarray, axis: int) -> float:
    """Energy fraction of a magnitude image's spectrum beyond half the Nyquist band along ``axis``."""
    spec = np.abs(centred_fft(image, (axis,))) ** 2
    n = image.shape[axis]
    k = np.abs(np.arange(n) - n // 2)
    sel = (k > n // 4).reshape([-1 if a == axis % image.ndim else 1 for a in range(image.ndim)])
    return float((spec * sel).sum() / spec.sum())


def remove_ky(buf: ReconBuffer, missing: int) -> ReconBuffer:
    """``buf`` with its first ``missing`` ky lines removed, described as the scanner would (limits shifted)."""
    ny = buf.data.shape[2]
    k = buf.data.copy()
    k[:, :, :missing] = 0
    sampled = buf.sampled.copy()
    sampled[:, :missing] = False
    enc = replace(buf.encoding, ky_center=ny // 2 - missing, ky_max=ny - 1 - missing)
    return replace(buf, data=k, sampled=sampled, encoding=enc)


@pytest.fixture(scope="module")
def simulated():
    """A fully sampled 128 x 128, 8-coil gradient-echo slice (smooth B0 + transceive phase), header."""
    from inline.simulate import simulate_scan

    scan = simulate_scan(matrix=128, slices=1, coils=8, snr=80, noise_samples=0, seed=3)
    header = scan.header
    chain = build_stages(header, overrides=KSPACE_BUFFERS)  # noise, oversampling, accumulate (k-space)
    (buf,) = payloads(run_chain(chain, scan.acquisitions), ReconBuffer)
    return buf, header


def synthetic_buffer(ny: int = 96, nx: int = 96, coils: int = 4) -> tuple[ReconBuffer, object]:
    """Rectangles and a disk with a smooth (quadratic + linear) phase, smooth complex coil maps."""
    y, x = np.mgrid[-1 : 1 : ny * 1j, -1 : 1 : nx * 1j]
    mag = ((np.abs(x) < 0.7) & (np.abs(y) < 0.6)) * 1.0 + ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.1) * 1.5
    mag += ((np.abs(x + 0.3) < 0.1) & (np.abs(y - 0.3) < 0.2)) * -0.6
    phase = 1.2 * x**2 - 0.8 * y + 0.6 * x * y
    coils_maps = np.stack(
        [np.exp(-((x - np.cos(a)) ** 2 + (y - np.sin(a)) ** 2) / 1.5) * np.exp(1j * (0.5 * c + 0.4 * x)) for c, a in
         enumerate(np.linspace(0, 2 * np.pi, coils, endpoint=False))]
    )
    img = (coils_maps * mag * np.exp(1j * phase))[:, None].astype(np.complex64)
    k = centred_fft(img, (2, 3)).astype(np.complex64)
    header = make_header(encoded=(nx, ny, 1), encoded_fov=(200.0, 200.0, 5.0), receiver_channels=coils)
    import ismrmrd

    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples, head.center_sample = nx, nx // 2
    buf = ReconBuffer(
        data=k, sampled=np.ones((1, ny), bool), index=AcquisitionIndex(), encoding=EncodingInfo.from_header(header),
        header=head, readout_fov_mm=200.0, history=["ACC"],
    )
    return buf, header


def run(buf, header, **params) -> ReconBuffer:
    return PartialFourier(context(header), PartialFourier.Params(**params)).apply(buf)


# Measured (seed 3): 3/8 removed: zero-filled 0.148, POCS 0.010, homodyne 0.022;
# 1/4 removed: zero-filled 0.053, POCS 0.006, homodyne 0.014.
@pytest.mark.parametrize("fraction, zf_min, pocs_max, homodyne_max", [(3 / 8, 0.10, 0.02, 0.035), (1 / 4, 0.04, 0.012, 0.025)])
def test_simulated_brain_pocs_and_homodyne_beat_zero_filling(simulated, fraction, zf_min, pocs_max, homodyne_max):
    full, header = simulated
    ny = full.data.shape[2]
    pf = remove_ky(full, round(fraction * ny))
    ref, zf = rss(full.data), rss(pf.data)
    pocs_out = run(pf, header, method="pocs")
    homodyne_out = run(pf, header, method="homodyne")
    e_zf, e_pocs, e_hd = nrmse(zf, ref), nrmse(rss(pocs_out.data), ref), nrmse(rss(homodyne_out.data), ref)
    assert e_zf > zf_min
    assert e_pocs < pocs_max and e_pocs < e_zf / 5
    assert e_hd < homodyne_max and e_hd < e_zf / 3
    # sharpness along y: high-frequency energy of the magnitude image back near the full one
    hf_ref, hf_zf = high_frequency_fraction(ref, 0), high_frequency_fraction(zf, 0)
    hf_pocs = high_frequency_fraction(rss(pocs_out.data), 0)
    assert abs(hf_pocs - hf_ref) < 0.25 * abs(hf_zf - hf_ref)
    # data consistency (POCS): acquired lines kept exactly
    np.testing.assert_array_equal(pocs_out.data[:, :, pf.sampled[0]], pf.data[:, :, pf.sampled[0]])
    assert pocs_out.data.shape == full.data.shape and pocs_out.data.dtype == np.complex64
    assert pocs_out.history[-1].startswith("PF-POCS") and homodyne_out.history[-1].startswith("PF-homodyne")
    # homodyne gives real coil images
    coil_images = centred_ifft(homodyne_out.data, (2, 3))
    assert np.abs(coil_images.imag).max() < 1e-4 * np.abs(coil_images).max()


def test_synthetic_phantom_missing_high_side():
    buf, header = synthetic_buffer()
    ny = buf.data.shape[2]
    missing = ny * 3 // 8
    k = buf.data.copy()
    k[:, :, ny - missing :] = 0  # the high side missing this time: limits 0..ny-1-missing, centre ny//2
    sampled = buf.sampled.copy()
    sampled[:, ny - missing :] = False
    pf = replace(buf, data=k, sampled=sampled, encoding=replace(buf.encoding, ky_max=ny - 1 - missing))
    ref, zf = rss(buf.data), rss(k)
    e_zf = nrmse(zf, ref)
    e_pocs = nrmse(rss(run(pf, header, iterations=30).data), ref)
    e_hd = nrmse(rss(run(pf, header, method="homodyne").data), ref)
    # measured: zero-filled 0.067, POCS 0.004, homodyne (ramp) 0.022
    assert e_zf > 0.05
    assert e_pocs < 0.15 * e_zf
    assert e_hd < 0.4 * e_zf


def test_asymmetric_echo_readout_filled():
    buf, header = synthetic_buffer()
    nx = buf.data.shape[3]
    cut = nx * 3 // 8  # first 3/8 of the readout not acquired
    head = type(buf.header).from_buffer_copy(buf.header)
    head.number_of_samples, head.center_sample = nx - cut, nx // 2 - cut
    pf = replace(buf, data=np.ascontiguousarray(buf.data[..., cut:]), header=head)
    out = run(pf, header)
    assert out.data.shape == buf.data.shape
    assert out.header.center_sample == nx // 2 and out.header.number_of_samples == nx
    assert pf.header.center_sample == nx // 2 - cut  # input header untouched
    np.testing.assert_array_equal(out.data[..., cut:], pf.data)  # acquired samples kept
    ref = rss(buf.data)
    zf = np.zeros_like(buf.data)
    zf[..., cut:] = pf.data
    e_zf, e_pocs = nrmse(rss(zf), ref), nrmse(rss(out.data), ref)
    # measured: zero-filled 0.063, POCS 0.009
    assert e_zf > 0.05 and e_pocs < 0.2 * e_zf
    hf_ref, hf_zf, hf_pocs = (high_frequency_fraction(i, 1) for i in (ref, rss(zf), rss(out.data)))
    assert abs(hf_pocs - hf_ref) < 0.5 * abs(hf_zf - hf_ref)


@pytest.mark.parametrize("method", ["pocs", "homodyne"])
def test_symmetric_data_passes_bit_for_bit(simulated, method):
    full, header = simulated
    before = full.data.copy()
    out = run(full, header, method=method)
    assert out is full
    np.testing.assert_array_equal(out.data, before)
    buf, header2 = synthetic_buffer()
    assert run(buf, header2, method=method) is buf


def test_parallel_imaging_gaps_alone_are_not_partial_fourier(simulated):
    full, header = simulated
    k = full.data.copy()
    k[:, :, 1::2] = 0  # R = 2, full extent: the header says symmetric
    sampled = full.sampled.copy()
    sampled[:, 1::2] = False
    buf = replace(full, data=k, sampled=sampled)
    assert run(buf, header) is buf
