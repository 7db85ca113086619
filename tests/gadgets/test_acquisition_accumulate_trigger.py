"""AcquisitionAccumulateTrigger: placement, routing by flags, averaging, triggers, traces."""

import logging

import ismrmrd
import numpy as np
import pytest
from chain_helpers import context, kspace_acquisitions, make_acq, make_header, payloads, run_chain

from gadgets.accumulate import AcquisitionAccumulateTrigger
from inline.buffers import AcquisitionIndex, ReconBuffer
from inline.trace import Trace

COILS, NY, NX = 3, 16, 32


def random_kspace(rng, nz=1, ny=NY, nx=NX):
    return (rng.standard_normal((COILS, nz, ny, nx)) + 1j * rng.standard_normal((COILS, nz, ny, nx))).astype(
        np.complex64
    )


def gadget(header=None, **params) -> AcquisitionAccumulateTrigger:
    header = header or make_header(encoded=(NX, NY, 1), encoded_fov=(300.0, 150.0, 5.0))
    return AcquisitionAccumulateTrigger(context(header), AcquisitionAccumulateTrigger.Params(**params))


def test_full_kspace_round_trip_header_and_trace():
    rng = np.random.default_rng(0)
    k = random_kspace(rng)
    acqs = kspace_acquisitions(k)
    for i, a in enumerate(acqs):
        a.position = (1.0, 2.0, float(i))
    traces = [Trace(100 + i, 100 + i) for i in range(len(acqs))]
    out = run_chain([gadget()], list(zip(acqs, traces)))

    assert len(out) == 1
    buf, trace = out[0]
    assert isinstance(buf, ReconBuffer)
    assert buf.data.dtype == np.complex64 and buf.data.shape == (COILS, 1, NY, NX)
    np.testing.assert_array_equal(buf.data, k)
    assert buf.sampled.all() and buf.reference is None
    assert buf.index == AcquisitionIndex()
    assert buf.readout_fov_mm == 300.0
    assert buf.header.idx.kspace_encode_step_1 == NY // 2  # line nearest the centre
    assert buf.header.position[2] == NY // 2
    assert (trace.first_arrival_ns, trace.last_arrival_ns) == (100, 100 + NY - 1)


def test_calibration_and_non_imaging_routing():
    rng = np.random.default_rng(1)
    k = random_kspace(rng)
    acqs = kspace_acquisitions(k)
    acqs[6].set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
    acqs[7].set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    extra = []
    for flag in (
        ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
        ismrmrd.ACQ_IS_NAVIGATION_DATA,
        ismrmrd.ACQ_IS_PHASECORR_DATA,
        ismrmrd.ACQ_IS_RTFEEDBACK_DATA,
        ismrmrd.ACQ_IS_HPFEEDBACK_DATA,
        ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
        ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA,
    ):
        extra.append(make_acq(np.full((COILS, NX), 1e6, np.complex64), ky=3, flags=[flag]))
    (buf,) = payloads(run_chain([gadget()], extra + acqs))

    assert not buf.sampled[0, 6] and np.all(buf.data[:, 0, 6] == 0)  # calibration kept out of the image
    assert buf.sampled[0, 7]
    np.testing.assert_array_equal(buf.data[:, 0, 3], k[:, 0, 3])  # the 1e6 lines went nowhere
    assert buf.reference is not None and buf.reference.shape == buf.data.shape
    assert np.flatnonzero(buf.reference_sampled[0]).tolist() == [6, 7]
    np.testing.assert_array_equal(buf.reference[:, 0, 6], k[:, 0, 6])
    np.testing.assert_array_equal(buf.reference[:, 0, 7], k[:, 0, 7])
    assert buf.sampled.sum() == NY - 1


def test_averages_are_averaged():
    a = np.full((COILS, NX), 1 + 1j, np.complex64)
    b = np.full((COILS, NX), 3 - 1j, np.complex64)
    acqs = [
        make_acq(a, ky=4, average=0),
        make_acq(b, ky=4, average=1),
        make_acq(a, ky=5, flags=[ismrmrd.ACQ_LAST_IN_SLICE]),
    ]
    (buf,) = payloads(run_chain([gadget()], acqs))
    np.testing.assert_allclose(buf.data[:, 0, 4], 2 + 0j)
    np.testing.assert_allclose(buf.data[:, 0, 5], 1 + 1j)
    assert buf.sampled[0].sum() == 2


def test_separate_averages_make_one_buffer_each():
    a = np.full((COILS, NX), 1 + 1j, np.complex64)
    b = np.full((COILS, NX), 3 - 1j, np.complex64)
    acqs = [
        make_acq(a, ky=4, average=0),
        make_acq(a, ky=5, average=0, flags=[ismrmrd.ACQ_LAST_IN_AVERAGE]),
        make_acq(b, ky=4, average=1),
        make_acq(b, ky=5, average=1, flags=[ismrmrd.ACQ_LAST_IN_AVERAGE]),
    ]
    bufs = payloads(run_chain([gadget(trigger="average", separate_averages=True)], acqs))
    assert [buf.index.average for buf in bufs] == [0, 1]
    np.testing.assert_allclose(bufs[0].data[:, 0, 4:6], 1 + 1j)
    np.testing.assert_allclose(bufs[1].data[:, 0, 4:6], 3 - 1j)


def test_partial_fourier_lines_are_centred():
    # 24 of 32 encoded lines, centre line 12: lines shift by 32 // 2 - 12 = 4
    header = make_header(encoded=(NX, 32, 1), ky=(0, 23, 12))
    k = random_kspace(np.random.default_rng(2), ny=24)
    (buf,) = payloads(run_chain([gadget(header)], kspace_acquisitions(k)))
    assert buf.data.shape == (COILS, 1, 32, NX)
    assert np.flatnonzero(buf.sampled[0]).tolist() == list(range(4, 28))
    np.testing.assert_array_equal(buf.data[:, 0, 16], k[:, 0, 12])  # k-space centre at 32 // 2
    assert buf.header.idx.kspace_encode_step_1 == 12


def test_inconsistent_centre_is_clamped(caplog):
    # a converter wrote centre 0 for fully sampled 0..15: the offset 8 would push lines off the grid
    header = make_header(encoded=(NX, NY, 1), ky=(0, NY - 1, 0))
    k = random_kspace(np.random.default_rng(3))
    with caplog.at_level(logging.WARNING):
        (buf,) = payloads(run_chain([gadget(header)], kspace_acquisitions(k)))
    np.testing.assert_array_equal(buf.data, k)
    assert any("clamped" in r.message for r in caplog.records)


def test_3d_kz_placement():
    header = make_header(encoded=(NX, 8, 6), encoded_fov=(300.0, 150.0, 60.0), kz=(0, 3, 1))
    k = random_kspace(np.random.default_rng(4), nz=4, ny=8)
    (buf,) = payloads(run_chain([gadget(header)], kspace_acquisitions(k)))
    assert buf.data.shape == (COILS, 6, 8, NX)
    assert np.flatnonzero(buf.sampled[:, 0]).tolist() == [2, 3, 4, 5]  # offset 6 // 2 - 1 = 2
    np.testing.assert_array_equal(buf.data[:, 2:6], k)


def two_slices_two_reps():
    acqs = []
    for rep in range(2):
        for slc in range(2):
            for ky in range(NY):
                flags = [ismrmrd.ACQ_LAST_IN_SLICE] if ky == NY - 1 else []
                if ky == NY - 1 and slc == 1:
                    flags.append(ismrmrd.ACQ_LAST_IN_REPETITION)
                acqs.append(
                    make_acq(
                        np.full((COILS, NX), ky + 10 * slc + 100 * rep, np.complex64), ky=ky, slice=slc, repetition=rep
                    )
                )
                for f in flags:
                    acqs[-1].set_flag(f)
    return acqs


@pytest.mark.parametrize(
    "trigger, triggers, emitted_before_close",
    [("slice", 4, 4), ("repetition", 2, 4), ("none", 0, 0), ("contrast", 0, 0)],
)
def test_trigger_counts(trigger, triggers, emitted_before_close):
    g = gadget(trigger=trigger)
    acqs = two_slices_two_reps()
    emitted = [b for a in acqs for b, _ in g.process(a, Trace.arrived())]
    assert g.trigger_count == triggers
    assert len(emitted) == emitted_before_close
    rest = [b for b, _ in g.close()]
    buffers = emitted + rest
    assert len(buffers) == 4
    assert sorted((b.index.slice, b.index.repetition) for b in buffers) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for b in buffers:
        assert b.data[0, 0, 3, 0] == 3 + 10 * b.index.slice + 100 * b.index.repetition


def test_last_in_measurement_flushes_everything():
    g = gadget(trigger="none")
    acqs = two_slices_two_reps()
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    emitted = [b for a in acqs for b, _ in g.process(a, Trace.arrived())]
    assert len(emitted) == 4 and list(g.close()) == []


def test_reversed_lines_are_flipped():
    line = np.arange(NX, dtype=np.complex64)[None].repeat(COILS, 0)
    acqs = [make_acq(line, ky=0), make_acq(line, ky=1, flags=[ismrmrd.ACQ_IS_REVERSE])]
    (buf,) = payloads(run_chain([gadget()], acqs))
    np.testing.assert_array_equal(buf.data[0, 0, 1], line[0, ::-1])
    (buf,) = payloads(run_chain([gadget(flip_reversed_lines=False)], acqs))
    np.testing.assert_array_equal(buf.data[0, 0, 1], line[0])


def test_discards_and_asymmetric_readout_fov():
    # 2x oversampling removed upstream: 20 kept samples, centre 4, of a symmetric 32 (4 before
    # the centre, 16 after) -> half the encoded FOV (600 mm over 64 encoded samples)
    header = make_header(encoded=(64, NY, 1), encoded_fov=(600.0, 300.0, 5.0))
    acq = make_acq(np.ones((COILS, 22), np.complex64), ky=0, center=5)
    acq.discard_pre, acq.discard_post = 1, 1
    (buf,) = payloads(run_chain([gadget(header)], [acq]))
    assert buf.data.shape[-1] == 20
    assert buf.header.number_of_samples == 20 and buf.header.center_sample == 4
    assert buf.header.discard_pre == buf.header.discard_post == 0
    assert buf.readout_fov_mm == pytest.approx(600.0 * 32 / 64)


def test_calibration_only_buffers_wait_for_imaging_lines(caplog):
    cal = make_acq(np.ones((COILS, NX)), ky=2, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, ismrmrd.ACQ_LAST_IN_SLICE])
    g = gadget()
    assert list(g.process(cal, Trace.arrived())) == []
    with caplog.at_level(logging.WARNING):
        assert list(g.close()) == []
    assert any("calibration lines only" in r.message for r in caplog.records)


def test_bad_lines_raise():
    with pytest.raises(ValueError, match="outside the encoded grid"):
        run_chain([gadget()], [make_acq(np.ones((COILS, NX)), ky=NY + 3)])
    with pytest.raises(ValueError, match="coils, samples"):
        run_chain([gadget()], [make_acq(np.ones((COILS, NX)), ky=0), make_acq(np.ones((COILS + 1, NX)), ky=1)])
    with pytest.raises(ValueError):
        AcquisitionAccumulateTrigger.Params(trigger="segment")


def test_hybrid_lines_make_a_hybrid_buffer_and_other_lines_are_converted():
    """A buffer takes its first line's domain; a k-space line (here IS_REVERSE, flipped in k-space
    first) joining a hybrid buffer is transformed along the readout, and vice versa."""
    from chain_helpers import centred_fft, centred_ifft

    from inline.buffers import HYBRID, KSPACE

    rng = np.random.default_rng(4)
    k = random_kspace(rng)
    hybrid = centred_ifft(k, axes=(-1,)).astype(np.complex64)

    def acqs(first_hybrid: bool):
        out = []
        for y in range(NY):
            reverse = y % 4 == 3
            if (y == 0) == first_hybrid and not reverse:
                a = make_acq(hybrid[:, 0, y], ky=y)
                a.domain = HYBRID
            else:
                a = make_acq(k[:, 0, y, ::-1] if reverse else k[:, 0, y], ky=y, flags=[ismrmrd.ACQ_IS_REVERSE] if reverse else [])
            out.append(a)
        return out

    (buf,) = payloads(run_chain([gadget()], acqs(first_hybrid=True)))
    assert buf.domain == HYBRID
    np.testing.assert_allclose(buf.data, hybrid, atol=1e-5)
    (buf,) = payloads(run_chain([gadget()], acqs(first_hybrid=False)))
    assert buf.domain == KSPACE
    np.testing.assert_allclose(buf.data, k, atol=1e-5)
    np.testing.assert_allclose(centred_fft(hybrid, axes=(-1,)), k, atol=1e-5)
