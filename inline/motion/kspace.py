"""When in the acquisition did the patient move: per-shot k-space consistency and a change-point search.

A repetition (or average) of a scan samples the same k-space lines as the reference
repetition. Without motion a line differs from its reference line by noise only; once the
head has moved, every later line differs by the moved object's change -- a phase ramp
along kx for a shift along the readout, a phase step across ky for a shift along phase
encoding, changed magnitudes for a rotation -- in proportion to the line's signal. So:

1. per line, the energy of ``b - a`` (current minus reference, all channels) over the
   readout without its ends, divided by the noise energy expected there; the noise power
   per sample comes from the ends of the readout (outer ``edge_fraction`` on each side,
   where the object has next to no signal): the mean power there, pooled as the median over
   the quarter of the lines with the least reference signal (a moved object with sharp
   edges raises the ends of the lines it changed; see ``gadgets.motion.noise_power``);
2. per shot (echo train), the mean of its lines: ``r_s = 1`` for noise alone, with a
   relative spread ``1 / sqrt(n_s)`` for ``n_s`` complex samples;
3. the shots in acquisition order, ``x_s = log r_s`` minus a threshold ``tau_s = k sigma_s``,
   and the contiguous run of shots with the largest sum (maximum subarray, Kadane's
   algorithm, the offline counterpart of Page's CUSUM, Biometrika 1954;41:100): its first
   shot is where the motion happened. The logarithm keeps the k-space centre, a thousand
   times above the noise, from outweighing the rest; the threshold makes noise-only shots
   count against a run, so a run starts where the inconsistency starts.

A run is "localised" only where the shots just outside it carry enough signal that the
change would have shown in them, yet they are consistent; a run from the first shot, or one
that starts where the lines first get strong enough, means the repetition as a whole
differs from the reference: motion before it started (between repetitions), which image
registration measures.
Sources: the k-space self-navigation idea of FID and k-space-centre navigators (e.g. Kober
et al., MRM 2011;66:135) and of data-consistency motion detection; here with the reference
repetition as the navigator, so every line, not just the centre, tells the time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def line_stats(reference: np.ndarray, line: np.ndarray, edge_fraction: float = 0.0625) -> tuple[float, int, float]:
    """Difference energy of one readout against its reference.

    Args:
        reference, line: ``(coils, samples)`` complex readouts of the same (kz, ky).
        edge_fraction: fraction of the readout at each end that measures the noise.

    Returns:
        ``(band_energy, band_samples, edge_power)``: sum of ``|b - a|^2`` over the readout
        without its ends, the number of complex samples summed, and the mean of
        ``|b - a|^2`` over the ends (noise power per sample of the difference, ``2 sigma^2``
        for noise alone, averaged over the channels as the band sum is; a median would be
        biased for channels of unequal noise).

    Raises:
        ValueError: shapes differ or the readout is too short for its ends.
    """
    a = np.asarray(reference)
    b = np.asarray(line)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"line_stats: need two (coils, samples) readouts of one shape, got {a.shape}, {b.shape}")
    n = a.shape[1]
    e = max(1, int(round(n * edge_fraction)))
    if n <= 2 * e + 1:
        raise ValueError(f"line_stats: a {n}-sample readout has no band inside its {e}-sample ends")
    d = (b - a).astype(np.complex64, copy=False)
    p = d.real**2 + d.imag**2
    edges = np.concatenate([p[:, :e], p[:, n - e :]], axis=1)
    return float(p[:, e : n - e].sum()), int(p[:, e : n - e].size), float(edges.mean())


@dataclass(frozen=True)
class ShotChange:
    """The run of inconsistent shots found by :func:`find_change`.

    Attributes:
        start: index (in the given order) of the first shot of the run; None when no run
            reached ``min_evidence``.
        stop: one past its last shot (``len`` when the run lasts to the end).
        evidence: the run's sum of ``log r_s - tau_s`` (0 when nothing was found).
        start_localised: the shots just before ``start`` carry enough signal that the
            inconsistency seen from ``start`` on would have shown in them, and they are
            consistent: the patient moved at ``start``. False for a run from the first shot
            or one that begins where the signal first suffices (motion before the frame,
            visible only once the lines are strong enough).
        stop_localised: likewise after the run: the patient moved back (or on to a pose
            matching the reference) at ``stop``.
    """

    start: int | None
    stop: int
    evidence: float
    start_localised: bool = False
    stop_localised: bool = False

    @property
    def during(self) -> bool:
        """The patient moved during the frame (at :attr:`moment`)."""
        return self.start is not None and (self.start_localised or self.stop_localised)

    @property
    def moment(self) -> int | None:
        """Index of the first shot after the motion: ``start`` if localised, else ``stop`` if localised."""
        if self.start is None:
            return None
        if self.start_localised:
            return self.start
        return self.stop if self.stop_localised else None


def shot_scores(band_energy: np.ndarray, band_samples: np.ndarray, noise_power: float) -> np.ndarray:
    """``r_s = band_energy / (band_samples * noise_power)`` per shot (1 for noise alone)."""
    e = np.asarray(band_energy, dtype=np.float64)
    n = np.maximum(np.asarray(band_samples, dtype=np.float64), 1.0)
    return e / (n * max(float(noise_power), 1e-300))


def find_change(
    ratio: np.ndarray,
    samples: np.ndarray,
    signal: np.ndarray | None = None,
    k_sigma: float = 4.0,
    min_evidence: float = 3.0,
    lookback: int = 4,
) -> tuple[ShotChange, np.ndarray]:
    """The most inconsistent contiguous run of shots (maximum subarray of ``log r - tau``).

    Args:
        ratio: ``(shots,)`` per-shot ``r_s`` (:func:`shot_scores`), in acquisition order.
        samples: ``(shots,)`` complex samples behind each ``r_s``.
        signal: ``(shots,)`` reference signal power per sample over the noise power of the
            difference (the shot's SNR, squared, halved); None: the run is localised when
            it does not start at the first shot.
        k_sigma: the threshold ``tau_s`` in noise spreads: ``k sigma_s`` with ``sigma_s``
            ``1 / sqrt(n_s)`` times the larger of 1 and the RMS of ``log r * sqrt(n)`` over
            the shots with ``r < 1`` (motion only raises ``r``, so those are noise; real
            repetitions are up to 2x noisier than white noise).
        min_evidence: smallest run sum reported (noise alone stays below 0.5).
        lookback: shots before (after) the run checked for :attr:`ShotChange.start_localised`
            (``stop_localised``): one of them must be consistent although the excess per unit
            signal of the run's first (last) three shots, times its signal, would put it
            ``2 k_sigma`` spreads above the noise.

    Returns:
        ``(ShotChange, tau)`` with ``tau`` the ``(shots,)`` thresholds.
    """
    r = np.maximum(np.asarray(ratio, dtype=np.float64), 1e-12)
    n = np.maximum(np.asarray(samples, dtype=np.float64), 1.0)
    x = np.log(r)
    if x.size == 0:
        return ShotChange(None, 0, 0.0), np.zeros(0)
    sigma = 1.0 / np.sqrt(n)
    z = x / sigma  # in units of the white-noise spread
    if np.count_nonzero(z < 0) >= 8:
        # motion only raises r: the shots below 1 are noise, their RMS the real spread
        sigma = sigma * max(1.0, float(np.sqrt(np.mean(z[z < 0] ** 2))))
    tau = np.log1p(k_sigma * sigma)
    y = x - tau
    best, cur, start, b_start, b_stop = -np.inf, 0.0, 0, 0, 0
    for i, v in enumerate(y):
        if cur <= 0.0:
            cur, start = float(v), i
        else:
            cur += float(v)
        if cur > best:
            best, b_start, b_stop = cur, start, i + 1
    if best < min_evidence:
        return ShotChange(None, 0, max(float(best), 0.0)), tau
    s = None if signal is None else np.maximum(np.asarray(signal, dtype=np.float64), 1e-300)

    def quiet_where_visible(edge: slice, side: np.ndarray) -> bool:
        """Some shot of ``side`` is consistent although the run's ``edge`` shots predict a visible change."""
        if side.size == 0:
            return False
        if s is None:
            return True
        per_signal = float(np.median((r[edge] - 1.0) / s[edge]))
        expected = per_signal * s[side]  # excess r - 1 had these shots been moved too
        return bool(np.any((expected >= 2.0 * k_sigma * sigma[side]) & (y[side] < 0.0)))

    start_ok = quiet_where_visible(
        slice(b_start, min(b_start + 3, b_stop)), np.arange(max(0, b_start - lookback), b_start)
    )
    stop_ok = quiet_where_visible(
        slice(max(b_start, b_stop - 3), b_stop), np.arange(b_stop, min(x.size, b_stop + lookback))
    )
    return ShotChange(b_start, b_stop, float(best), start_ok, stop_ok), tau
