"""Mid-scan motion within one k-space buffer: lines that their ky neighbours no longer predict.

Fully sampled multi-coil k-space is redundant: the coil sensitivities make each line a
linear combination of its neighbours across the channels (the regeneration of k-space lines
that GRAPPA uses; Bydder, Larkman & Hajnal, MRM 2002;47:677 used it to find motion-corrupted
lines). Fit one kernel that predicts line ``ky`` from lines ``ky - 1`` and ``ky + 1``
(``kernel_kx`` samples each, all channels) over the whole buffer. If the head moved between
two lines acquired in sequence, only the two target lines whose neighbourhood straddles the
moment see data of two object positions, and their prediction error jumps; every other line
is predicted as well as before.

How large a jump counts is decided against the noise, not against the line's signal:

* per target line, the residual energy over all channels and readout samples divided by what
  white noise alone leaves, ``W (C + ||K||_F^2)`` per unit noise power (``W`` samples, ``C``
  channels, the kernel ``K`` adds its neighbours' noise): a chi-square ratio ``chi``;
* the unit is taken from the data: the median ``chi`` of the outermost eighth of the target
  lines on each side of k-space, where the object contributes next to nothing (so neither a
  noise scan nor prewhitening is needed; a channel-correlated noise only rescales it);
* each line against its surroundings: ``z = (chi - b) / (b sqrt(1 / dof))`` with ``b`` the
  median ``chi`` of the target lines 2-6 lines away (at least 1), ``dof = W C``; near the
  k-space centre the kernel's own model error grows with the signal (the lines next to the
  peak reach ``chi`` ~ 50 in clean data), so target lines within ``centre_exclusion`` lines
  of the centre are left out (the central block is checked between repetitions instead);
* the score of the moment between targets ``b - 1`` and ``b`` is the smaller ``z`` of the two
  minus the larger of the targets just beyond, ``b - 2`` and ``b + 1`` (at least 0): motion
  raises exactly the two straddling targets, while one disturbed line (an RF spike) raises
  three -- itself and the two it is a neighbour of; the buffer's score is the largest over
  the moments.

Calibration (192 clean simulated 64 x 64 brains ``sim_variant(7000 + j)`` of
``bench/qc_eval.py``, 4-8 channels, SNR 20-80; motion at 30-70 % of a sequential ky order):
clean scores reach 7.7; above 10 (``configs/qc.yaml``) are 37 % of 2 mm, 66 % of 5 mm, 20 % of
2 deg and 40 % of 5 deg mid-scan motions (the rest fall near the centre, are too small for the
noise of a 64 x 64 scan, or rotate little where the lines are). Real phantoms: 14-32
channels <= 3.0; a 2-channel scan 21.6 (too little coil redundancy: ``ReadoutQC`` needs 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Offsets of the lines whose median ``chi`` is a target's local baseline.
_LOCAL = np.array([-6, -5, -4, -3, -2, 2, 3, 4, 5, 6])


@dataclass(frozen=True)
class Jump:
    """The strongest moment of a buffer.

    Attributes:
        score: smaller ``z`` of the two straddling target lines (noise standard deviations).
        ky: the last line before the moment (the moment lies between ``ky`` and ``ky + 1``).
        targets: target lines scored.
    """

    score: float
    ky: int
    targets: int


def consistency_jump(
    lines: np.ndarray,
    ky: np.ndarray,
    centre: int,
    kernel_kx: int = 3,
    virtual_coils: int = 8,
    centre_exclusion: int = 5,
) -> Jump | None:
    """Score the largest jump of the ky-neighbour prediction error of one buffer.

    Args:
        lines: ``(lines, coils, kx)`` complex k-space lines of one kz plane, any scale.
        ky: ``(lines,)`` int ky index of each line, ascending, distinct.
        centre: ky of the k-space centre.
        kernel_kx: readout samples of each neighbour line in the kernel (odd).
        virtual_coils: channels are compressed to this many first (SVD of the central lines'
            channel covariance, BART ``cc -S`` style): the fit costs ``(2 kernel_kx C)^2``.
        centre_exclusion: target lines closer than this to ``centre`` are not scored.

    Returns:
        The :class:`Jump`, or None when fewer than 16 target lines (with both neighbours)
        lie outside the exclusion, or the buffer has no noise-dominated outer lines.

    Raises:
        ValueError: shapes that do not agree, or an even ``kernel_kx``.
    """
    if lines.ndim != 3 or ky.shape != (lines.shape[0],):
        raise ValueError(f"lines must be (lines, coils, kx) with one ky each, got {lines.shape} and {ky.shape}")
    if kernel_kx % 2 != 1 or kernel_kx >= lines.shape[2]:
        raise ValueError(f"kernel_kx must be odd and below the readout length {lines.shape[2]}, got {kernel_kx}")
    ky = np.asarray(ky, int)
    pos = {int(y): i for i, y in enumerate(ky)}
    targets = np.array([y for y in ky if y - 1 in pos and y + 1 in pos], int)
    if len(targets) < 16:
        return None
    arr = np.asarray(lines, np.complex64)
    coils = arr.shape[1]
    if coils > virtual_coils:
        near = np.argsort(np.abs(ky - centre))[:9]
        block = arr[near].transpose(1, 0, 2).reshape(coils, -1)
        _, vec = np.linalg.eigh(block @ block.conj().T)
        arr = np.matmul(vec[:, ::-1][:, :virtual_coils].conj().T.astype(np.complex64), arr)
        coils = virtual_coils
    w = arr.shape[2] - kernel_kx + 1
    lo = arr[[pos[y - 1] for y in targets]]
    hi = arr[[pos[y + 1] for y in targets]]
    x = np.concatenate([side[:, :, s : s + w] for side in (lo, hi) for s in range(kernel_kx)], axis=1)
    h = kernel_kx // 2
    y = arr[[pos[t] for t in targets]][:, :, h : h + w]
    xm = x.transpose(0, 2, 1).reshape(-1, x.shape[1])
    ym = y.transpose(0, 2, 1).reshape(-1, coils)
    xh = xm.conj().T
    gram = (xh @ xm).astype(np.complex128)
    ridge = 1e-4 * float(np.real(np.trace(gram))) / gram.shape[0]
    kernel = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), (xh @ ym).astype(np.complex128)).astype(np.complex64)
    residual = (ym - xm @ kernel).reshape(len(targets), w, coils)
    chi = (np.abs(residual) ** 2).sum(axis=(1, 2)) / (w * (coils + float((np.abs(kernel) ** 2).sum())))
    q = max(2, len(targets) // 8)
    unit = float(np.median(np.concatenate([chi[:q], chi[-q:]])))
    if not unit > 0:
        return None
    chi /= unit
    want = targets[:, None] + _LOCAL[None, :]
    at = np.clip(np.searchsorted(targets, want), 0, len(targets) - 1)
    valid = targets[at] == want
    base = np.ones(len(targets))
    some = valid.any(axis=1)  # isolated targets (missing lines around them) keep the unit
    base[some] = np.nanmedian(np.where(valid, chi[at], np.nan)[some], axis=1)
    base = np.maximum(base, 1.0)
    z = (chi - base) / (base * np.sqrt(1.0 / (w * coils)))
    outer = np.abs(targets - centre) >= centre_exclusion
    best: tuple[float, int] | None = None
    for i in range(1, len(targets) - 2):
        if targets[i + 2] == targets[i - 1] + 3 and outer[i] and outer[i + 1]:
            # the two lines beyond must stay quiet: one disturbed line (an RF spike) raises three targets
            s = float(min(z[i], z[i + 1]) - max(z[i - 1], z[i + 2], 0.0))
            if best is None or s > best[0]:
                best = (s, int(targets[i]))
    if best is None:
        return None
    return Jump(best[0], best[1], int(outer.sum()))
