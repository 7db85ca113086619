"""Cartesian FFT reconstruction with field-of-view adjustment to the recon matrix.

Sources: Gadgetron ``gadgets/mri_core/FFTGadget`` / ``GenericReconCartesianFFTGadget``
(centred orthonormal inverse FFT of the buffer) and
``GenericReconFieldOfViewAdjustmentGadget`` (reach the recon pixel size by k-space
zero-padding or cropping, then cut the image to the recon matrix), done here in k-space
before the single inverse FFT, which gives the same result with one transform.
"""

from __future__ import annotations

import dataclasses

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.fft
from pydantic import Field, field_validator

from gadgets import snapshot_patch
from gadgets._common import centred_resize, readout_placement
from inline.backend import fft_module, get_array_module
from inline.buffers import HYBRID, EarlySnapshot, EncodingInfo, ImageBuffer, ReconBuffer
from inline.gadget import GadgetParams, PureGadget
from inline.registry import register
from inline.threads import lower_thread_priority


def kspace_grid(current_fov_mm: float, current_n: int, recon_fov_mm: float, recon_n: int) -> int:
    """Number of k-space samples that give the recon pixel size over the current FOV.

    ``round(current_fov_mm / (recon_fov_mm / recon_n))``; the current size when the recon
    FOV or matrix is not set (0).
    """
    if recon_fov_mm <= 0 or recon_n <= 0 or current_fov_mm <= 0:
        return current_n
    return max(round(float(current_fov_mm) * recon_n / float(recon_fov_mm)), 1)


def _checkerboards(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``prod_axes (-1)^n`` over a grid of even sizes (float32), and the same times
    ``prod_axes (-1)^(N/2)``, the shift theorem's constant, applied once. A size of 1 stands
    for an axis that is not transformed (broadcast)."""
    sign = np.ones((), np.float32)
    for n in shape:
        ramp = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
        sign = sign[..., np.newaxis] * ramp
    constant = np.float32((-1.0) ** sum(n // 2 for n in shape))
    return sign, sign * constant


_CHECKERBOARDS: dict[tuple[str, tuple[int, ...]], tuple] = {}


def _board_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """Sizes from the first transformed axis to the last axis, 1 where an axis is not transformed."""
    axes = tuple(sorted(a % len(shape) for a in axes))
    return tuple(shape[a] if a in axes else 1 for a in range(axes[0], len(shape)))


def _centred(k: np.ndarray, axes: tuple[int, ...], workers: int, inverse: bool) -> np.ndarray:
    xp = get_array_module(k)
    fft = fft_module(xp)
    kw = {"workers": workers} if xp is np else {}
    transform = fft.ifftn if inverse else fft.fftn
    if any(k.shape[a] % 2 for a in axes):
        img = fft.ifftshift(k, axes=axes)
        img = transform(img, axes=axes, norm="ortho", overwrite_x=True, **kw)
        return fft.fftshift(img, axes=axes)
    key = (xp.__name__, _board_shape(k.shape, axes))
    boards = _CHECKERBOARDS.get(key)
    if boards is None:
        boards = _CHECKERBOARDS.setdefault(key, tuple(xp.asarray(b) for b in _checkerboards(key[1])))
    before, after = boards
    img = k * before
    img = transform(img, axes=axes, norm="ortho", overwrite_x=True, **kw)
    img *= after
    return img


def centred_ifft(k: np.ndarray, axes: tuple[int, ...], workers: int = -1) -> np.ndarray:
    """``fftshift(ifftn(ifftshift(k)), norm="ortho")`` over ``axes``, complex64 in, complex64 out.

    For even sizes the two shifts equal a multiplication by ``(-1)^(n + N/2)`` before and
    after the transform (the shift theorem), which is done in place: 5.5 ms instead of
    11.4 ms for 32 x 256 x 256 here. Odd sizes use the shifts. ``k`` is not modified.
    ``workers``: scipy.fft threads (NumPy input only).
    """
    return _centred(k, axes, workers, inverse=True)


def centred_fft(x: np.ndarray, axes: tuple[int, ...], workers: int = -1) -> np.ndarray:
    """``fftshift(fftn(ifftshift(x)), norm="ortho")`` over ``axes`` (image -> k-space), the
    inverse of :func:`centred_ifft`; same dtype rules and shift-theorem path."""
    return _centred(x, axes, workers, inverse=False)


#: complex64 bytes per chunk of coils in :func:`rss_ifft`: 1 MiB, the L2 cache of one core here.
_RSS_CHUNK_BYTES = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helpers(workers: int) -> int:
    """Helper threads besides the caller for ``workers`` (-1: one per CPU)."""
    cpus = os.cpu_count() or 1
    n = cpus if workers < 0 else workers
    return max(0, min(n, cpus) - 1)


def _helper_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="inline-fft")
        return _pool


def rss_ifft(k: np.ndarray, axes: tuple[int, ...], workers: int = -1) -> np.ndarray:
    """Root-sum-of-squares over coils of the centred inverse FFT: ``(coils, ...)`` complex64 ->
    ``(1, ...)`` float32, equal to ``rss(centred_ifft(k, axes))``.

    Fused for speed: the magnitude of a centred transform is the plain transform's
    magnitude circularly shifted by ``n // 2`` along each transformed axis (the input
    ``ifftshift`` only multiplies the output by a unit-modulus phase ramp), so no shift or
    checkerboard pass touches the coil images; the shift is applied to the one combined
    image. Coils go in chunks of about 1 MiB, each transformed and squared while it is in
    cache (32 x 256 x 256 hybrid, ky transform only: 4.8 ms in one thread against 6.5 ms for
    :func:`centred_ifft` + 1.3 ms for the separate RSS, measured here). With NumPy input and
    ``workers`` != 1, up to ``workers - 1`` (-1: CPUs - 1) threads of a process-wide pool take
    chunks too (2.7 ms on 2 idle cores); the caller never waits for a helper that has not
    started (it is cancelled), so a busy pool or core only costs the parallel speed-up.
    ``axes`` must not include 0 (coils).
    """
    xp = get_array_module(k)
    fft = fft_module(xp)
    if 0 in (a % k.ndim for a in axes):
        raise ValueError("rss_ifft: axis 0 is the coil axis and cannot be transformed")
    kw = {"workers": 1} if xp is np else {}

    def chunk(c0: int, c1: int):
        x = fft.ifftn(k[c0:c1], axes=axes, norm="ortho", **kw)
        v = x.view(np.float32)  # (chunk, ..., 2 * nx): re, im interleaved
        return xp.einsum("c...,c...->...", v, v)

    total = _sum_over_coil_chunks(k, chunk, workers)
    sq = total[..., 0::2] + total[..., 1::2]
    xp.sqrt(sq, out=sq)
    shifts = tuple(k.shape[a] // 2 for a in axes)
    return xp.roll(sq, shifts, axis=tuple(a % k.ndim - 1 for a in axes))[np.newaxis]


def _sum_over_coil_chunks(k: Any, chunk, workers: int, min_coils: int = 1) -> Any:
    """``sum(chunk(c0, c1))`` over chunks of about 1 MiB of the coil axis of ``k``.

    With NumPy input and ``workers`` != 1, helper threads of the process-wide pool take chunks
    too; the caller never waits for a helper that has not started (it is cancelled). The
    partial sums are added in chunk order whoever computed them, so the result is the same
    bits for any ``workers`` and any timing (a replayed journal gives the same images).
    """
    xp = get_array_module(k)
    coils = k.shape[0]
    per_coil = max(int(np.prod(k.shape[1:])) * 8, 1)
    step = max(min_coils, min(coils, _RSS_CHUNK_BYTES // per_coil))
    starts = list(range(0, coils, step))
    todo = list(range(len(starts)))[::-1]  # chunk numbers, popped in order
    done: dict[int, Any] = {}
    folded = {"next": 0, "total": None}
    lock, fold_lock = threading.Lock(), threading.Lock()

    def fold(wait: bool = False) -> None:
        """Add the finished chunks that are next in order. One thread at a time; a thread that
        finds another folding goes back to transforming (the last call, ``wait``, adds the rest)."""
        if not fold_lock.acquire(blocking=wait):
            return
        try:
            while True:
                with lock:
                    part = done.pop(folded["next"], None)
                if part is None:
                    return
                total = folded["total"]
                folded["total"] = part if total is None else xp.add(total, part, out=total)
                folded["next"] += 1
        finally:
            fold_lock.release()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            c0 = starts[i]
            part = chunk(c0, min(c0 + step, coils))
            with lock:
                done[i] = part
            fold()

    helpers = _helpers(workers) if xp is np else 0
    futures = [_helper_pool().submit(work) for _ in range(min(helpers, len(starts) - 1))]
    work()
    for f in futures:
        if not f.cancel():
            f.result()
    fold(wait=True)
    return folded["total"]


class Cancelled(Exception):
    """A transform stopped between coil chunks because its result is no longer wanted."""


def coil_images_coils_last(
    k: Any, axes: tuple[int, ...], out_shape: tuple[int, int, int], workers: int = -1, cancelled=None
) -> tuple[Any, Any]:
    """Centred inverse FFT of ``k`` ``(coils, kz, ky, kx)`` complex64 over ``axes``, cropped or
    padded to ``out_shape`` ``(z, y, x)``, returned coils last, ``(z * y, x, coils)`` complex64,
    with the sum of squares over coils ``(z * y, x)`` float32.

    What :mod:`gadgets.snapshot_patch` keeps of an early snapshot, made in 1 MiB coil chunks
    that stay in cache from transform to transposed write (threads as :func:`rss_ifft`), so
    no whole-size intermediate is written. ``cancelled()`` (optional) is asked before each
    chunk; when it says True, :class:`Cancelled` is raised.
    """
    xp = get_array_module(k)
    z, y, x = out_shape
    coils_last = xp.empty((z * y, x, k.shape[0]), np.complex64)

    def chunk(c0: int, c1: int):
        if cancelled is not None and cancelled():
            raise Cancelled
        img = centred_resize(centred_ifft(k[c0:c1], axes, workers=1), out_shape, (1, 2, 3))
        coils_last[:, :, c0:c1] = img.reshape(c1 - c0, z * y, x).transpose(1, 2, 0)
        v = img.view(np.float32)
        return xp.einsum("c...,c...->...", v, v)

    # 8 coils: a whole 64-byte cache line of coils_last per pixel and chunk
    total = _sum_over_coil_chunks(k, chunk, workers, min_coils=8)
    return coils_last, (total[..., 0::2] + total[..., 1::2]).reshape(z * y, x)


@dataclass(frozen=True)
class _Plan:
    """How :class:`FFTRecon` turns a buffer of one geometry into its image (see its steps)."""

    hybrid: bool  # transform ky/kz only (readout already in image space, nothing to do along x)
    back_to_kspace: bool  # hybrid input taken back to k-space along x first
    nx_full: int
    x_offset: int
    target: tuple[int, int, int]  # (z, y, x) k-space grid for the recon pixel size
    gain: float
    out_shape: tuple[int, int, int]  # (z, y, x) recon matrix
    three_d: bool

    @property
    def axes(self) -> tuple[int, ...]:
        if self.hybrid:
            return (1, 2) if self.three_d else (2,)
        return (1, 2, 3) if self.three_d else (2, 3)

    def along_x(self, k: Any, workers: int) -> Any:
        """Steps 1 and 2 along x (and, for a hybrid buffer that needs it, the way back to k-space)."""
        if self.back_to_kspace:
            k = centred_fft(k, (3,), workers)
        if self.nx_full != k.shape[3]:  # asymmetric echo: zero-fill the missing side
            full = get_array_module(k).zeros(k.shape[:3] + (self.nx_full,), np.complex64)
            full[..., self.x_offset : self.x_offset + k.shape[3]] = k
            k = full
        return k if self.hybrid else centred_resize(k, self.target[2:], (3,))

    def kspace(self, k: Any, workers: int) -> Any:
        """``(coils, kz, ky, kx)`` buffer data ready for the transform over :attr:`axes`."""
        return centred_resize(self.along_x(k, workers), self.target[:2], (1, 2))


@register
class FFTRecon(PureGadget):
    """Centred inverse FFT of a k-space buffer to coil images on the recon matrix and FOV.

    Input ``ReconBuffer.data`` ``(coils, kz, ky, kx)`` complex64, in k-space or hybrid
    space (``domain`` :data:`~inline.buffers.HYBRID`: ``(coils, kz, ky, x)``, the readout
    already transformed); output ``ImageBuffer.data`` ``(coils, z, y, x)`` complex64 with
    ``(x, y, z)`` = the header's recon matrix (``z`` = 1 for 2D encodings) and
    ``field_of_view_mm`` = the recon FOV; with ``coil_combine: rss``, ``(1, z, y, x)`` float32,
    the root-sum-of-squares over coils (:func:`rss_ifft`, history ``FFT``, ``RSS``: the same
    image :class:`~gadgets.coil_combine.CoilCombine` ``rss`` makes from the coil images).

    Steps:

    1. readout placement: a readout whose ``header.center_sample`` is not ``kx // 2``
       (asymmetric echo) is zero-padded to the symmetric length around that centre;
    2. FOV adjustment, per axis (x over ``readout_fov_mm``, y and, for 3D, z over the
       encoded FOV): k-space is centred-cropped or zero-padded to
       :func:`kspace_grid` samples so the pixel size equals the recon one; image values
       are kept (scaled by ``sqrt(new / old)`` per resized axis, band-limited
       interpolation), where Gadgetron scales only its zero-padding branch;
    3. ``fftshift(ifftn(ifftshift(k), norm="ortho"))`` over (ky, kx) or (kz, ky, kx) with
       ``scipy.fft`` (``fft_workers`` threads; complex64 stays complex64), see
       :func:`centred_ifft`; over ky (and kz) only for a hybrid buffer. A hybrid buffer
       whose readout needs step 1 or an x resize in step 2 is first taken back to k-space
       along x (:func:`centred_fft`), so the result does not depend on the domain;
    4. centred crop / zero-pad in the image domain to the recon matrix.

    The orthonormal transform keeps whitened noise at its per-sample variance and equals
    BART's ``fft -u -i`` (for even sizes).

    Early snapshots (:class:`~inline.buffers.EarlySnapshot`, from an accumulator with
    ``early_lines``): the snapshot is transformed to coil images when it arrives, while the
    scanner still acquires; when the complete buffer follows with at most
    ``early_max_lines`` new lines (none of them resampled) and a snapshot image within
    ``early_max_mb``, only those lines are transformed and added
    (:mod:`gadgets.snapshot_patch`): the whole transform's image to float32 rounding.
    Otherwise the complete buffer is transformed whole. That choice depends on the data
    only, so a replayed journal gives the same bits: a snapshot that is not done when its
    buffer arrives (still queued on a busy machine, revoked, or not kept for
    ``early_cache_mb``) is not waited for; the buffer makes the snapshot's image itself from
    its data with the new lines zeroed (bit for bit what the background thread would have
    kept, counted in :attr:`late`) and patches it. That costs a copy and a coil-image
    transform per late snapshot (15-20 ms for 32 x 256 x 256 here, against 3-5 ms for the
    whole transform); ``early_deterministic: false`` transforms such a buffer whole instead,
    less work on an overloaded machine, but its image then matches a replay only to float32
    rounding. Snapshots are transformed on a thread of
    their own at low priority (``early_in_background``): the snapshots of all slices of an
    interleaved scan arrive in the same TR, and on a busy machine they take longer than it
    (25 ms each measured in the 2D benchmark, 7 ms alone).

    Raises:
        ValueError: ``data`` is not 4-D ``(coils, kz, ky, kx)``.
    """

    class Params(GadgetParams):
        fft_workers: int = Field(-1, description="Threads for scipy.fft and the fused RSS (-1: all CPUs; not 0).")
        coil_combine: Literal["none", "rss"] = Field(
            "none",
            description="none: coil images; rss: root-sum-of-squares fused into the transform (one pass, "
            "float32 magnitude, as CoilCombine rss; leave CoilCombine walsh chains at none).",
        )

        early_max_lines: int = Field(
            8, ge=0, description="Most lines added to an early snapshot's image; more, and the buffer is transformed whole."
        )
        early_cache_mb: float = Field(
            1024.0, gt=0, description="Memory for the images of early snapshots awaiting their last lines [MiB]."
        )
        early_in_background: bool = Field(
            True,
            description="Transform snapshots on a low-priority thread of their own: a complete buffer never waits for "
            "another slice's snapshot, and one whose snapshot is not done yet makes the snapshot's image itself.",
        )
        early_deterministic: bool = Field(
            True,
            description="A buffer whose snapshot is not done makes the snapshot's image itself and patches it, so images "
            "do not depend on timing (journal replays bit for bit; costs a copy and a coil-image transform per late "
            "snapshot); false: it is transformed whole (less work on an overloaded machine, images then match a replay "
            "to float32 rounding).",
        )
        early_max_mb: float = Field(
            64.0,
            gt=0,
            description="Largest snapshot image kept [MiB]: bigger buffers (3D volumes: 537 MiB for 8 x 256 x 256 x 128), "
            "whose transform outlasts the last few TRs, are transformed whole.",
        )

        @field_validator("fft_workers")
        @classmethod
        def _not_zero(cls, v: int) -> int:
            if v == 0:
                raise ValueError("fft_workers must be >= 1 or negative (-1: all CPUs)")
            return v

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer, EarlySnapshot)
    emits: ClassVar[tuple[type, ...]] = (ImageBuffer,)
    accepts_hybrid: ClassVar[bool] = True

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._kept: dict[int, snapshot_patch.SnapshotImage] = {}
        self._kept_bytes = 0
        self._said_too_big = False
        self._lock = threading.Lock()  # _kept, _kept_bytes, _queued, _dropped
        self._queued: set[int] = set()  # tokens queued or being transformed
        self._dropped: set[int] = set()  # of those, tokens whose buffer did not wait
        self._snapshots: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        #: complete buffers whose image came from an early snapshot, those transformed whole, and
        #: of the patched, those whose snapshot was not done in time and was made after the last readout
        self.patched = self.transformed = self.late = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """Transform zeros of the header's shapes once, at session start.

        The first transform of a shape pays for FFT plans, worker threads and fresh pages
        (measured 40-70 ms instead of 12 ms for 32 x 256 x 256); the first slice should not.
        Both readout lengths (with and without oversampling removal) and both the full and
        the hybrid (ky/kz only) transform are warmed.
        """
        try:
            enc = EncodingInfo.from_header(self.header)
            coils = int(self.header.acquisitionSystemInformation.receiverChannels or 1)
        except (AttributeError, TypeError, ValueError):
            return
        ex, ey, ez = enc.encoded_matrix
        rx, ry, rz = enc.recon_matrix
        fx, fy, fz = enc.recon_fov_mm
        if min(ex, ey) <= 0 or coils * ex * ey * max(ez, 1) > 2**26:
            return
        ny = kspace_grid(enc.encoded_fov_mm[1], ey, fy, ry)
        nz = kspace_grid(enc.encoded_fov_mm[2], ez, fz, rz) if ez > 1 else 1
        workers = self.params.fft_workers
        for n_read, fov_read in {(ex, enc.encoded_fov_mm[0]), (ex // 2, enc.encoded_fov_mm[0] / 2)}:
            nx = kspace_grid(fov_read, n_read, fx, rx)
            k = np.zeros((coils, nz, ny, nx), np.complex64)
            for axes in ((1, 2, 3), (1, 2)) if nz > 1 else ((2, 3), (2,)):
                if self.params.coil_combine == "rss":
                    rss_ifft(k, axes, workers)
                # coil images: the plain path, and the rss path's early snapshots
                scipy.fft.ifftn(k, axes=axes, norm="ortho", workers=workers)

    @staticmethod
    def _plan(item: ReconBuffer) -> _Plan:
        k = item.data
        if k.ndim != 4:
            raise ValueError(f"FFTRecon: buffer data must be (coils, kz, ky, kx), got shape {k.shape}")
        enc = item.encoding
        _, nz, ny, nx = k.shape
        three_d = nz > 1
        center = getattr(item.header, "center_sample", 0) if item.header is not None else 0
        nx_full, x_offset = readout_placement(nx, center)
        rx, ry, rz = enc.recon_matrix
        fx, fy, fz = enc.recon_fov_mm
        target = (
            kspace_grid(enc.encoded_fov_mm[2], nz, fz, rz) if three_d else 1,
            kspace_grid(enc.encoded_fov_mm[1], ny, fy, ry),
            kspace_grid(item.readout_fov_mm, nx_full, fx, rx),
        )
        hybrid = item.domain == HYBRID
        back = hybrid and (nx_full != nx or target[2] != nx)  # the readout needs k-space work
        return _Plan(
            hybrid=hybrid and not back,
            back_to_kspace=back,
            nx_full=nx_full,
            x_offset=x_offset,
            target=target,
            gain=float(np.sqrt(np.prod(target) / (nz * ny * nx_full))),
            out_shape=(rz if three_d and rz > 0 else target[0], ry if ry > 0 else target[1], rx if rx > 0 else target[2]),
            three_d=three_d,
        )

    def _combine(self, coils: int) -> str:
        return "rss" if self.params.coil_combine == "rss" and coils > 1 else "none"

    @staticmethod
    def _geometry(item: ReconBuffer) -> tuple:
        """What must match between a snapshot and its complete buffer for the patch."""
        center = getattr(item.header, "center_sample", 0) if item.header is not None else 0
        return (item.data.shape, item.domain, center, item.readout_fov_mm, item.encoding, type(item.data))

    def _take_snapshot(self, snap: EarlySnapshot) -> None:
        """Transform an early snapshot now or hand it to the snapshot thread."""
        if not self.params.early_in_background:
            self._keep_snapshot(snap)
            return
        if self._worker is None:
            self._snapshots = queue.Queue()
            self._worker = threading.Thread(
                target=self._snapshot_worker, name=f"{self.context.session_id}:fft:snapshots", daemon=True
            )
            self._worker.start()
        with self._lock:
            self._queued.add(snap.token)
        self._snapshots.put(snap)

    def _snapshot_worker(self) -> None:
        lower_thread_priority()
        while True:
            snap = self._snapshots.get()
            if snap is None:
                return
            with self._lock:
                dropped = snap.token in self._dropped
            try:
                if not dropped:
                    self._keep_snapshot(snap)
            except Exception:  # the complete buffer is then transformed whole
                self.log.exception("FFTRecon: early snapshot of slice %d failed", snap.buffer.index.slice)
            finally:
                snap.release()
                with self._lock:
                    self._queued.discard(snap.token)
                    if snap.token in self._dropped:
                        self._dropped.discard(snap.token)
                        kept = self._kept.pop(snap.token, None)
                        if kept is not None:
                            self._kept_bytes -= kept.nbytes

    def _is_dropped(self, token: int) -> bool:
        with self._lock:
            return token in self._dropped

    def _claim(self, token: int) -> snapshot_patch.SnapshotImage | None:
        """The kept image of snapshot ``token``; None (and the snapshot dropped) when it is not done."""
        with self._lock:
            kept = self._kept.pop(token, None)
            if kept is not None:
                self._kept_bytes -= kept.nbytes
            elif token in self._queued:
                self._dropped.add(token)
            return kept

    def _too_big(self, item: ReconBuffer, plan: _Plan) -> bool:
        """Whether the coil images of ``item`` are over ``early_max_mb`` (no snapshot path)."""
        return item.data.shape[0] * int(np.prod(plan.out_shape)) * 8 > self.params.early_max_mb * 2**20

    def _snapshot_image(self, item: ReconBuffer, plan: _Plan, workers: int, cancelled=None, done_reading=None):
        """What is kept of a snapshot: its coil images (coils last, with their sum of squares for RSS).

        The same bits for any ``workers`` (ordered coil-chunk sums, per-transform FFTs), so the
        late path (:meth:`_late_snapshot`) gives what the background thread would have.
        ``done_reading()`` (optional) is called once ``item.data`` is no longer read.
        """
        k = plan.kspace(item.data, workers)
        coils = item.data.shape[0]
        if self._combine(coils) == "rss":
            coils_last, s0 = coil_images_coils_last(k, plan.axes, plan.out_shape, workers, cancelled)
            if done_reading is not None:
                done_reading()
            return snapshot_patch.SnapshotImage(
                "rss", (coils, *plan.out_shape), coils_last, s0, None, self._geometry(item), coils_last.nbytes + s0.nbytes
            )
        img = centred_ifft(k, plan.axes, workers)
        if done_reading is not None:
            done_reading()
        return snapshot_patch.keep(centred_resize(img, plan.out_shape, (1, 2, 3)), self._geometry(item))

    def _keep_snapshot(self, snap: EarlySnapshot) -> None:
        """Transform an early snapshot to coil images and keep them for its complete buffer."""
        if not snap.begin_read():
            return  # revoked: its buffer has left already (it makes the snapshot's image itself)
        try:
            item = snap.buffer
            plan = self._plan(item)
            if self._too_big(item, plan):
                if not self._said_too_big:
                    self._said_too_big = True
                    self.log.info(
                        "FFTRecon: %.0f MiB snapshot images are over early_max_mb %.0f; these buffers are transformed whole",
                        item.data.shape[0] * int(np.prod(plan.out_shape)) * 8 / 2**20, self.params.early_max_mb,
                    )
                return
            need = item.data.shape[0] * int(np.prod(plan.out_shape)) * 8
            with self._lock:
                held = self._kept_bytes
            if held + need > self.params.early_cache_mb * 2**20:
                self.log.warning(
                    "FFTRecon: early snapshot of slice %d not kept (%.0f MiB held, limit early_cache_mb %.0f); "
                    "its buffer makes it after the last readout",
                    item.index.slice, held / 2**20, self.params.early_cache_mb,
                )
                return
            # on the low-priority thread, no helper threads: the shared pool runs at normal
            # priority and would take cores from the data path
            workers = 1 if self.params.early_in_background else self.params.fft_workers
            try:
                kept = self._snapshot_image(item, plan, workers, lambda: self._is_dropped(snap.token), snap.release)
            except Cancelled:  # its buffer came first and made the snapshot's image itself
                return
            with self._lock:
                self._kept[snap.token] = kept
                self._kept_bytes += kept.nbytes
        finally:
            snap.release()

    def _late_snapshot(self, item: ReconBuffer, plan: _Plan, lines: tuple[tuple[int, int], ...]):
        """The snapshot's image made from the complete buffer: its data with the lines written
        after the snapshot set back to zero, which is what the snapshot held (none of them was
        resampled). Bit for bit what the background thread would have kept, so the image does
        not depend on whether the snapshot was done in time."""
        data = item.data.copy()
        xp = get_array_module(data)
        zs = xp.asarray(np.array([z for z, _ in lines], np.intp))
        ys = xp.asarray(np.array([y for _, y in lines], np.intp))
        data[:, zs, ys, :] = 0
        return self._snapshot_image(dataclasses.replace(item, data=data), plan, self.params.fft_workers)

    def _discard(self, token: int) -> None:
        """Free the kept image of snapshot ``token`` or stop its transform: its buffer does not use it."""
        self._claim(token)

    def _patched(self, item: ReconBuffer, plan: _Plan) -> tuple[Any, list[str]] | None:
        """The image from the snapshot plus the new lines, or None when the buffer is transformed whole.

        Which of the two is decided from the data alone (the lines written after the
        snapshot, the size), never from timing: a snapshot that is not done yet is made here
        from the buffer (:meth:`_late_snapshot`), so a replay gives the same bits.
        """
        since = item.since_snapshot
        if since is None:
            return None
        if since.resampled or len(since.lines) > self.params.early_max_lines or self._too_big(item, plan):
            self._discard(since.token)
            return None
        kept = self._claim(since.token)
        if kept is None or kept.key != self._geometry(item):
            if not self.params.early_deterministic:
                return None
            kept = self._late_snapshot(item, plan, since.lines)
            self.late += 1
        xp = get_array_module(item.data)
        workers = self.params.fft_workers
        zs = xp.asarray(np.array([z for z, _ in since.lines], np.intp))
        ys = xp.asarray(np.array([y for _, y in since.lines], np.intp))
        _, nz, ny, _ = item.data.shape
        # readouts along x: (coils, 1, lines, kx) -> (coils, lines, x)
        h = plan.along_x(item.data[:, zs, ys, :][:, None], workers)
        if not plan.hybrid:
            h = centred_ifft(h, (3,), workers)
        h = centred_resize(h, plan.out_shape[2:], (3,))[:, 0]
        # ky/kz impulses: (lines, kz, ky, 1) -> (lines, pixels)
        imp = xp.zeros((len(zs), nz, ny, 1), np.complex64)
        imp[xp.arange(len(zs)), zs, ys, 0] = 1
        imp = centred_resize(imp, plan.target[:2], (1, 2))
        e = centred_ifft(imp, (1, 2) if plan.three_d else (2,), workers)
        e = centred_resize(e, plan.out_shape[:2], (1, 2)).reshape(len(zs), -1)
        img = snapshot_patch.patch(kept, xp.ascontiguousarray(h), xp.ascontiguousarray(e))
        return img, (["FFT", "RSS"] if kept.combine == "rss" else ["FFT"])

    def close(self):
        if self._worker is not None:
            self._snapshots.put(None)
            self._worker.join(timeout=10.0)
            self._worker = None
        with self._lock:
            self._kept.clear()
            self._kept_bytes = 0
        return ()

    def apply(self, item: ReconBuffer | EarlySnapshot) -> ImageBuffer | None:
        if isinstance(item, EarlySnapshot):
            self._take_snapshot(item)
            return None
        plan = self._plan(item)
        done = self._patched(item, plan)
        if done is not None:
            img, steps = done
            self.patched += 1
        else:
            self.transformed += 1
            workers = self.params.fft_workers
            k = plan.kspace(item.data, workers)
            if self._combine(k.shape[0]) == "rss":
                img = rss_ifft(k, plan.axes, workers)
                steps = ["FFT", "RSS"]
            else:
                img = centred_ifft(k, plan.axes, workers)
                steps = ["FFT"]
            img = centred_resize(img, plan.out_shape, (1, 2, 3))
        if plan.gain != 1.0:
            img *= np.float32(plan.gain)
        enc = item.encoding
        fx, fy, fz = enc.recon_fov_mm
        return ImageBuffer(
            data=img if img.dtype == np.float32 else img.astype(np.complex64, copy=False),
            index=item.index,
            header=item.header,
            field_of_view_mm=(
                float(fx or item.readout_fov_mm),
                float(fy or enc.encoded_fov_mm[1]),
                float(fz or enc.encoded_fov_mm[2]),
            ),
            history=[*item.history, *steps],
            meta=dict(item.meta),
        )
