"""Early snapshots: the accumulator sends a buffer before its last lines, FFTRecon transforms it
then and adds only the last lines' contribution; the image must equal the whole transform."""

import dataclasses
import logging

import ismrmrd
import numpy as np
import pytest
from chain_helpers import context, kspace_acquisitions, make_header, payloads, recon_buffer, run_chain

from gadgets.accumulate import AcquisitionAccumulateTrigger
from gadgets.fft_recon import FFTRecon
from gadgets.oversampling import RemoveReadoutOversampling
from inline.buffers import EarlySnapshot, ImageBuffer, LinesSince, ReconBuffer
from inline.config import ConfigError, parse_chain, validate_chain
from inline.trace import Trace


buffer = recon_buffer


def snapshot_of(full: ReconBuffer, lines, token: int) -> tuple[EarlySnapshot, ReconBuffer]:
    """The snapshot without ``lines`` ((kz, ky) pairs) and the complete buffer that names them."""
    data = full.data.copy()
    sampled = full.sampled.copy()
    for z, y in lines:
        data[:, z, y] = 0
        sampled[z, y] = False
    snap = EarlySnapshot(dataclasses.replace(full, data=data, sampled=sampled), token)
    return snap, dataclasses.replace(full, since_snapshot=LinesSince(token, tuple(lines)))


GEOMETRIES = [
    # encoded (x, y, z), recon, readout FOV / encoded FOV, centre sample
    ((64, 48, 1), None, 1.0, None),  # plain 2D
    ((64, 48, 1), (48, 32, 1), 1.0, None),  # recon matrix smaller: image crop
    ((128, 48, 1), (64, 48, 1), 1.0, None),  # 2x readout oversampling cut in k-space (FOV adjustment)
    ((64, 48, 1), None, 1.0, 40),  # asymmetric echo: zero-filled (hybrid: back to k-space first)
    ((32, 16, 8), None, 1.0, None),  # 3D: ky and kz transformed
    ((33, 15, 1), None, 1.0, None),  # odd sizes: the shift path
]


@pytest.mark.parametrize("encoded, recon, fov_ratio, center", GEOMETRIES)
@pytest.mark.parametrize("domain", ["kspace", "hybrid"])
@pytest.mark.parametrize("combine", ["rss", "none"])
@pytest.mark.parametrize("n_lines", [1, 3])
def test_patched_image_equals_the_whole_transform(encoded, recon, fov_ratio, center, domain, combine, n_lines):
    rng = np.random.default_rng(sum(encoded) + n_lines)
    nx, ny, nz = encoded
    recon_fov = None
    if recon is not None and recon[0] != nx:  # oversampled readout: recon FOV half the encoded one
        recon_fov = (120.0, 180.0, 5.0)
    header = make_header(encoded=encoded, encoded_fov=(240.0, 180.0, 80.0 if nz > 1 else 5.0), recon=recon, recon_fov=recon_fov)
    k = rng.standard_normal((4, nz, ny, nx)) + 1j * rng.standard_normal((4, nz, ny, nx))
    full = buffer(k, header, center=center, domain=domain)
    picks = rng.choice(nz * ny, n_lines, replace=False)
    lines = [(int(p // ny), int(p % ny)) for p in picks]
    snap, complete = snapshot_of(full, lines, token=7)
    params = FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine=combine)

    want = FFTRecon(context(header), params).apply(full)
    fft = FFTRecon(context(header), params)
    assert fft.apply(snap) is None  # the snapshot makes no image
    assert snap.released.is_set()
    got = fft.apply(complete)

    assert fft.patched == 1 and fft.transformed == 0
    assert got.data.shape == want.data.shape and got.data.dtype == want.data.dtype
    assert got.history == want.history and got.field_of_view_mm == want.field_of_view_mm
    np.testing.assert_allclose(got.data, want.data, atol=2e-5 * np.abs(want.data).max())


@pytest.mark.parametrize("encoded, recon, fov_ratio, center", GEOMETRIES)
@pytest.mark.parametrize("domain", ["kspace", "hybrid"])
@pytest.mark.parametrize("combine", ["rss", "none"])
def test_a_late_snapshot_gives_the_same_bits_as_one_done_in_time(encoded, recon, fov_ratio, center, domain, combine):
    """Whether the snapshot was transformed before its buffer came (the scanner's pace) or
    not (a replay as fast as the disk reads) must not show in the image: journal replays
    are bit for bit. The late image is made on 2 threads, the early one on 1."""
    rng = np.random.default_rng(sum(encoded) + 5)
    nx, ny, nz = encoded
    recon_fov = (120.0, 180.0, 5.0) if recon is not None and recon[0] != nx else None
    header = make_header(encoded=encoded, encoded_fov=(240.0, 180.0, 80.0 if nz > 1 else 5.0), recon=recon, recon_fov=recon_fov)
    k = rng.standard_normal((16, nz, ny, nx)) + 1j * rng.standard_normal((16, nz, ny, nx))
    full = buffer(k, header, center=center, domain=domain)
    picks = rng.choice(nz * ny, 2, replace=False)
    lines = [(int(p // ny), int(p % ny)) for p in picks]
    in_time = FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine=combine))
    snap, complete = snapshot_of(full, lines, token=31)
    in_time.apply(snap)
    want = in_time.apply(complete)
    late = FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=2, coil_combine=combine))
    got = late.apply(snapshot_of(full, lines, token=32)[1])  # its snapshot never came
    assert (in_time.late, late.late, late.patched) == (0, 1, 1)
    assert got.data.tobytes() == want.data.tobytes()


def test_the_centre_line_last_carries_most_of_the_image():
    """A real object whose k-space centre line arrives last: the snapshot's image is far from
    the final one, the patched one equals it."""
    header = make_header(encoded=(64, 64, 1), encoded_fov=(240.0, 240.0, 5.0))
    y, x = np.mgrid[:64, :64]
    obj = ((y - 32) ** 2 + (x - 30) ** 2 < 400).astype(np.complex64)
    coil_maps = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 800.0) for cx, cy in [(0, 0), (63, 0), (0, 63), (63, 63)]])
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(obj * coil_maps, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))[:, None]
    full = buffer(k, header)
    snap, complete = snapshot_of(full, [(0, 32)], token=1)
    fft = FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss"))
    before = FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss")).apply(snap.buffer).data
    fft.apply(snap)
    got = fft.apply(complete).data
    want = np.sqrt((np.abs(obj * coil_maps) ** 2).sum(0))
    np.testing.assert_allclose(got[0, 0], want, atol=1e-5 * want.max())
    assert np.abs(before[0, 0] - want).max() > 0.2 * want.max()


@pytest.mark.parametrize(
    "change, why",
    [
        ("resampled", "a line of the snapshot changed (averages)"),
        ("too_many", "more lines than early_max_lines"),
    ],
)
def test_whole_transform_when_the_patch_does_not_apply(change, why):
    rng = np.random.default_rng(3)
    header = make_header(encoded=(32, 24, 1), encoded_fov=(240.0, 180.0, 5.0))
    k = rng.standard_normal((3, 1, 24, 32)) + 1j * rng.standard_normal((3, 1, 24, 32))
    full = buffer(k, header)
    lines = [(0, y) for y in range(4)] if change == "too_many" else [(0, 5)]
    snap, complete = snapshot_of(full, lines, token=11)
    if change == "resampled":
        complete = dataclasses.replace(complete, since_snapshot=LinesSince(11, ((0, 5),), resampled=True))
    params = FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss", early_max_lines=3)
    fft = FFTRecon(context(header), params)
    fft.apply(snap)
    got = fft.apply(complete)
    want = FFTRecon(context(header), params).apply(complete)
    assert (fft.patched, fft.transformed) == (0, 1), why
    np.testing.assert_array_equal(got.data, want.data)
    assert fft._kept_bytes == 0  # the unused snapshot image is freed


@pytest.mark.parametrize(
    "change, why",
    [
        ("shape", "the kept snapshot has another geometry than the complete buffer"),
        ("token", "no kept snapshot under that token"),
    ],
)
def test_the_buffer_makes_the_snapshot_image_when_none_fits(change, why):
    """The choice between patch and whole transform depends on the data, not on what is kept:
    without a matching kept image the buffer makes the snapshot's image from its own data."""
    rng = np.random.default_rng(3)
    header = make_header(encoded=(32, 24, 1), encoded_fov=(240.0, 180.0, 5.0))
    k = rng.standard_normal((3, 1, 24, 32)) + 1j * rng.standard_normal((3, 1, 24, 32))
    snap, complete = snapshot_of(buffer(k, header), [(0, 5)], token=11)
    if change == "shape":
        complete = dataclasses.replace(complete, readout_fov_mm=complete.readout_fov_mm * 2)
    else:
        complete = dataclasses.replace(complete, since_snapshot=LinesSince(12, ((0, 5),)))
    params = FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss", early_max_lines=3)
    fft = FFTRecon(context(header), params)
    fft.apply(snap)
    got = fft.apply(complete)
    alone = FFTRecon(context(header), params).apply(complete)  # never saw the snapshot
    whole = FFTRecon(context(header), params).apply(dataclasses.replace(complete, since_snapshot=None))
    assert (fft.patched, fft.late, fft.transformed) == (1, 1, 0), why
    assert got.data.tobytes() == alone.data.tobytes()
    np.testing.assert_allclose(got.data, whole.data, rtol=1e-5, atol=1e-5 * float(whole.data.max()))


def test_snapshots_over_the_size_limit_are_not_kept(caplog):
    """A 3D-volume-sized snapshot (here over a small early_max_mb) is not kept: whole transform."""
    header = make_header(encoded=(32, 16, 8), encoded_fov=(240.0, 120.0, 80.0))
    full = buffer(np.ones((4, 8, 16, 32)), header)
    snap, complete = snapshot_of(full, [(3, 3)], token=5)
    fft = FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=1, early_max_mb=0.1))  # needs 0.125 MiB
    with caplog.at_level(logging.INFO):
        fft.apply(snap)
    assert snap.released.is_set() and not fft._kept and "early_max_mb" in caplog.text
    np.testing.assert_array_equal(fft.apply(complete).data, FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=1)).apply(full).data)
    assert (fft.patched, fft.transformed) == (0, 1)


def test_snapshots_beyond_the_memory_limit_are_not_kept(caplog):
    header = make_header(encoded=(64, 64, 1), encoded_fov=(240.0, 240.0, 5.0))
    k = np.ones((8, 1, 64, 64), np.complex64)
    fft = FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss", early_cache_mb=0.3))
    snaps = [snapshot_of(buffer(k, header), [(0, 3)], token=t) for t in (1, 2)]
    with caplog.at_level(logging.WARNING):
        for snap, _ in snaps:
            fft.apply(snap)
    assert list(fft._kept) == [1] and snaps[1][0].released.is_set()
    assert "early_cache_mb" in caplog.text
    fft.apply(snaps[0][1])
    fft.apply(snaps[1][1])  # its snapshot was not kept: the buffer makes the snapshot's image
    assert (fft.patched, fft.late, fft.transformed) == (2, 1, 0) and fft._kept_bytes == 0


# -- the accumulator's side ---------------------------------------------------------------


def slices_kspace(rng, slices=3, coils=4, ny=16, nx=32):
    return [(rng.standard_normal((coils, 1, ny, nx)) + 1j * rng.standard_normal((coils, 1, ny, nx))).astype(np.complex64) for _ in range(slices)]


def interleaved(kspaces, order=None):
    """Multi-slice acquisitions, slices interleaved line by line; ``order`` = ky order per slice."""
    per_slice = []
    for s, k in enumerate(kspaces):
        acqs = kspace_acquisitions(k, slice=s)
        if order is not None:
            acqs = [acqs[i] for i in order]
            for a in acqs:
                a.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
        per_slice.append(acqs)
    return [a for group in zip(*per_slice) for a in group]


@pytest.mark.parametrize("early_lines", [1, 2])
@pytest.mark.parametrize("hybrid", [False, True])
def test_chain_images_are_those_without_snapshots(early_lines, hybrid):
    """Accumulator + FFTRecon with early snapshots: one snapshot per slice, every image patched,
    and the same images as the chain without snapshots; 2x readout oversampling removed (in
    hybrid space or in k-space) on the way."""
    rng = np.random.default_rng(early_lines)
    header = make_header(encoded=(64, 16, 1), encoded_fov=(480.0, 120.0, 5.0), recon=(32, 16, 1), recon_fov=(240.0, 120.0, 5.0))
    kspaces = slices_kspace(rng, nx=64)
    order = list(range(8, 16)) + list(range(8))[::-1]  # centre-out-ish: the centre line late
    acqs = interleaved(kspaces, order)

    def chain(early):
        ctx = context(header)
        return [
            RemoveReadoutOversampling(ctx, RemoveReadoutOversampling.Params(output_domain="hybrid" if hybrid else "kspace")),
            AcquisitionAccumulateTrigger(ctx, AcquisitionAccumulateTrigger.Params(early_lines=early)),
            FFTRecon(ctx, FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss")),
        ]

    plain, early = chain(0), chain(early_lines)
    want = payloads(run_chain(plain, acqs), ImageBuffer)
    got = payloads(run_chain(early, acqs), ImageBuffer)
    assert len(got) == len(want) == 3
    assert (early[2].patched, early[2].transformed) == (3, 0)
    assert (plain[2].patched, plain[2].transformed) == (0, 3)
    for g, w in zip(got, want):
        assert g.index == w.index
        np.testing.assert_allclose(g.data, w.data, atol=2e-5 * w.data.max())


def test_accumulator_sends_one_snapshot_per_buffer_and_names_the_last_lines():
    rng = np.random.default_rng(5)
    header = make_header(encoded=(32, 16, 1), encoded_fov=(240.0, 120.0, 5.0))
    kspaces = slices_kspace(rng, slices=2)
    acc = AcquisitionAccumulateTrigger(context(header), AcquisitionAccumulateTrigger.Params(early_lines=2))
    out = payloads(run_chain([acc], interleaved(kspaces)))
    kinds = [type(p).__name__ for p in out]
    # slice 0 and 1 snapshots after their 14th line, the buffers after their 16th
    assert kinds == ["EarlySnapshot", "EarlySnapshot", "ReconBuffer", "ReconBuffer"]
    snaps, bufs = out[:2], out[2:]
    for s, (snap, buf) in enumerate(zip(snaps, bufs)):
        assert snap.buffer.index.slice == buf.index.slice == s
        assert snap.buffer.sampled.sum() == 14 and not snap.buffer.sampled[0, 14:].any()
        assert buf.since_snapshot == LinesSince(snap.token, ((0, 14), (0, 15)), False)
        np.testing.assert_array_equal(buf.data, kspaces[s])
        assert not snap.begin_read()  # nobody downstream read it: withdrawn when the buffer left
    assert snaps[0].token != snaps[1].token


def test_lines_arriving_while_the_snapshot_is_read_leave_it_untouched():
    """Until the consumer releases the snapshot, later lines are held aside; a buffer that must
    leave while the snapshot is being read gets its own copy, so the array never changes under
    its reader; a snapshot nobody has started reading is withdrawn instead (no copy)."""
    rng = np.random.default_rng(8)
    header = make_header(encoded=(32, 16, 1), encoded_fov=(240.0, 120.0, 5.0))
    (k,) = slices_kspace(rng, slices=1)
    acqs = kspace_acquisitions(k)

    def feed(acc, lines):
        return [p for a in lines for p, _ in acc.process(a, Trace.arrived())]

    def accumulator():
        return AcquisitionAccumulateTrigger(context(header), AcquisitionAccumulateTrigger.Params(early_lines=1))

    # being read when the buffer leaves: copied
    acc = accumulator()
    (snap,) = feed(acc, acqs[:-1])
    assert isinstance(snap, EarlySnapshot) and snap.begin_read()
    (buf,) = feed(acc, acqs[-1:])
    assert isinstance(buf, ReconBuffer) and buf.data is not snap.buffer.data
    assert not snap.buffer.data[:, 0, 15].any() and snap.buffer.sampled.sum() == 15
    np.testing.assert_array_equal(buf.data, k)
    snap.release()

    # never read: withdrawn, its array goes on in the buffer
    acc = accumulator()
    (snap,) = feed(acc, acqs[:-1])
    (buf,) = feed(acc, acqs[-1:])
    assert buf.data is snap.buffer.data and not snap.begin_read() and snap.released.is_set()
    np.testing.assert_array_equal(buf.data, k)

    # released in time: no copy, the held line is written into the shared array
    acc = accumulator()
    (snap,) = feed(acc, acqs[:-1])
    assert snap.begin_read()
    snap.release()
    out = feed(acc, acqs[-1:])
    (buf,) = out
    assert buf.data is snap.buffer.data
    np.testing.assert_array_equal(buf.data, k)

    # a line arriving while it is read is held aside until the release
    acc = AcquisitionAccumulateTrigger(context(header), AcquisitionAccumulateTrigger.Params(early_lines=2))
    (snap,) = feed(acc, acqs[:-2])
    assert snap.begin_read()
    assert feed(acc, acqs[-2:-1]) == []
    assert not snap.buffer.data[:, 0, 14].any()  # held aside
    snap.release()
    (buf,) = feed(acc, acqs[-1:])
    assert buf.data is snap.buffer.data
    np.testing.assert_array_equal(buf.data, k)


def test_no_snapshot_for_undersampled_or_averaged_scans():
    rng = np.random.default_rng(9)
    (k,) = slices_kspace(rng, slices=1)
    header = make_header(encoded=(32, 16, 1), encoded_fov=(240.0, 120.0, 5.0))
    acc = AcquisitionAccumulateTrigger(context(header), AcquisitionAccumulateTrigger.Params(early_lines=1))
    acqs = kspace_acquisitions(k)
    out = payloads(run_chain([acc], acqs[::2] + acqs[-1:]))  # R=2: 9 of 16 lines
    assert [type(p) for p in out] == [ReconBuffer] and out[0].since_snapshot is None
    # two averages averaged here: the limits say so, no snapshot
    header.encoding[0].encodingLimits.average = ismrmrd.xsd.limitType(minimum=0, maximum=1, center=0)
    acc = AcquisitionAccumulateTrigger(context(header), AcquisitionAccumulateTrigger.Params(early_lines=1))
    out = payloads(run_chain([acc], acqs[:-1] + acqs))
    assert [type(p) for p in out] == [ReconBuffer]


CHAIN = """
name: early
gadgets:
  - name: qc
    class: ReadoutQC
  - name: accumulate
    class: AcquisitionAccumulateTrigger
    parameters: {{early_lines: 1}}
{between}
  - name: fft
    class: FFTRecon
"""


def test_config_needs_fftrecon_to_take_the_snapshots():
    validate_chain(parse_chain(CHAIN.format(between="")))
    validate_chain(parse_chain(CHAIN.format(between="  - name: tap\n    class: ShotMotionQC")))  # taps do not count
    validate_chain(parse_chain(CHAIN.format(between="  - name: gpu\n    class: ToDevice")))  # moves them on
    with pytest.raises(ConfigError, match="'pf' .*PartialFourier.* takes its buffers.*early_lines: 0"):
        validate_chain(parse_chain(CHAIN.format(between="  - name: pf\n    class: PartialFourier")))
    with pytest.raises(ConfigError, match="no later gadget takes them"):
        validate_chain(parse_chain(CHAIN.format(between="").rsplit("  - name: fft", 1)[0]))


def test_to_device_forwards_snapshots():
    """Without a GPU ToDevice passes a snapshot on untouched (the chain stays on the CPU)."""
    from gadgets.device import ToDevice
    from inline.backend import cupy_available

    header = make_header(encoded=(32, 16, 1), encoded_fov=(240.0, 120.0, 5.0))
    snap, _ = snapshot_of(buffer(np.ones((2, 1, 16, 32)), header), [(0, 3)], token=3)
    moved = ToDevice(context(header)).apply(snap)
    assert isinstance(moved, EarlySnapshot) and moved.token == 3 and moved.released is snap.released
    if not cupy_available():
        assert moved is snap and not snap.released.is_set()


def test_background_snapshots_patch_when_done_and_never_hold_a_buffer_back(monkeypatch):
    """On the snapshot thread: a finished snapshot is patched; a complete buffer whose snapshot
    is still being transformed does not wait for it (whole transform, snapshot dropped)."""
    import threading
    import time

    import gadgets.fft_recon as fft_recon

    rng = np.random.default_rng(4)
    header = make_header(encoded=(32, 24, 1), encoded_fov=(240.0, 180.0, 5.0))
    full = buffer(rng.standard_normal((3, 1, 24, 32)) + 1j * rng.standard_normal((3, 1, 24, 32)), header)
    want = FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss")).apply(full)
    fft = FFTRecon(context(header), FFTRecon.Params(fft_workers=1, coil_combine="rss"))

    snap, complete = snapshot_of(full, [(0, 7)], token=21)
    assert fft.apply(snap) is None
    deadline = time.monotonic() + 10
    while 21 not in fft._kept and time.monotonic() < deadline:
        time.sleep(0.005)
    np.testing.assert_allclose(fft.apply(complete).data, want.data, atol=2e-5 * want.data.max())
    assert (fft.patched, fft.transformed) == (1, 0)

    gate, started = threading.Event(), threading.Event()
    real = fft_recon.coil_images_coils_last

    def slow(*args, **kw):  # the snapshot thread only
        if "snapshots" in threading.current_thread().name:
            started.set()
            gate.wait(10)
        return real(*args, **kw)

    monkeypatch.setattr(fft_recon, "coil_images_coils_last", slow)
    snap, complete = snapshot_of(full, [(0, 9)], token=22)
    fft.apply(snap)
    assert started.wait(10)
    t0 = time.monotonic()
    got = fft.apply(complete)  # the snapshot is still being transformed: no waiting
    assert time.monotonic() - t0 < 5
    assert (fft.patched, fft.late, fft.transformed) == (2, 1, 0)
    # the same bits as when the snapshot is done in time (a replay gives the same image)
    in_time = FFTRecon(context(header), FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss"))
    in_time.apply(snapshot_of(full, [(0, 9)], token=23)[0])
    on_time = in_time.apply(snapshot_of(full, [(0, 9)], token=23)[1])
    assert in_time.late == 0 and got.data.tobytes() == on_time.data.tobytes()
    np.testing.assert_allclose(got.data, want.data, atol=2e-5 * want.data.max())
    gate.set()
    fft.close()
    assert snap.released.is_set() and not fft._kept and fft._kept_bytes == 0 and not fft._queued and not fft._dropped


def test_a_dropped_snapshot_stops_between_coil_chunks():
    from gadgets.fft_recon import Cancelled, coil_images_coils_last

    k = np.ones((16, 1, 8, 8), np.complex64)
    asked = []
    with pytest.raises(Cancelled):
        coil_images_coils_last(k, (2,), (1, 8, 8), 1, cancelled=lambda: asked.append(1) or True)
    assert asked == [1]
    coils_last, s0 = coil_images_coils_last(k, (2,), (1, 8, 8), 1, cancelled=lambda: False)
    assert coils_last.shape == (8, 8, 16) and s0.shape == (8, 8)


def test_without_determinism_a_late_snapshot_means_a_whole_transform():
    header = make_header(encoded=(32, 24, 1), encoded_fov=(240.0, 180.0, 5.0))
    rng = np.random.default_rng(4)
    full = buffer(rng.standard_normal((3, 1, 24, 32)) + 1j * rng.standard_normal((3, 1, 24, 32)), header)
    params = FFTRecon.Params(early_in_background=False, fft_workers=1, coil_combine="rss", early_deterministic=False)
    fft = FFTRecon(context(header), params)
    got = fft.apply(snapshot_of(full, [(0, 5)], token=41)[1])  # its snapshot never came
    assert (fft.patched, fft.late, fft.transformed) == (0, 0, 1)
    assert got.data.tobytes() == FFTRecon(context(header), params).apply(full).data.tobytes()
