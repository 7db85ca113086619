"""Live quality control of combined images: SNR, motion ghosting, N/2 (Nyquist) ghosting.

A tap between coil combination and image finishing: the :class:`ImageBuffer` is yielded
first, untouched, then measured; findings follow as :class:`~inline.qc.alert.Alert`
messages (at most one per code, slice and repetition).

Sources: SNR from a background region with the noise-magnitude correction of Constantinides,
Atalar & McVeigh, MRM 1997;38:852 (RSS of N channels of Gaussian noise is chi-distributed
with 2N degrees of freedom); ghost-to-signal ratio as in the ACR / fBIRN QA protocols
(mean of the ghost region outside the object over the object mean); motion ghosting from
the PE-vs-readout background asymmetry (motion ghosts spread along phase encoding, thermal
noise is isotropic).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import scipy.ndimage as ndi
import scipy.stats
from pydantic import Field

from inline.backend import to_host
from inline.buffers import ImageBuffer
from inline.gadget import AccumulatingGadget, GadgetParams, Output
from inline.qc.alert import Alert, AlertCode, AlertFactory, Severity, slice_label
from inline.registry import register
from inline.trace import Trace


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D array (maximum between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def object_mask(mag: np.ndarray, margin_px: int = 3, relative: float = 0.15) -> np.ndarray:
    """Object mask of a ``(y, x)`` magnitude image, from the noise level rather than the object's.

    RSS images are shaded (bright near the coils), which defeats Otsu on the intensities;
    the background is what is predictable. On the 3x3-smoothed image (noise std / 3), pass
    1: a provisional background of pixels below twice the 15th percentile (the head covers
    < 85% of a field of view). Pass 2: object = above that background's mean + 4 std
    (dilated by ``margin_px`` first) and above ``relative`` x the 95th percentile (keeps ghosts
    out of the mask), opened (3x3), holes filled, specks
    (< 5% of the largest component) dropped. Falls back to Otsu when there is no background.
    """
    smooth = ndi.uniform_filter(mag.astype(np.float32, copy=False), size=3, mode="nearest")
    low = 2.0 * float(np.percentile(smooth, 15))
    prov = smooth > low
    bg = ~ndi.binary_dilation(prov, iterations=margin_px) if margin_px else ~prov
    if bg.sum() > 0.02 * mag.size:
        vals = smooth[bg]
        t = float(vals.mean() + 4.0 * vals.std())
    else:
        t = otsu_threshold(smooth.ravel())
    # artefacts (motion / N/2 ghosts) must stay outside: an object pixel is also above a fraction
    # of the bright object (fill_holes brings back dark interior such as CSF)
    t = max(t, relative * float(np.percentile(smooth, 95)))
    m = ndi.binary_opening(smooth > t, structure=np.ones((3, 3), bool))
    m = ndi.binary_fill_holes(m)
    lab, n = ndi.label(m)
    if n > 1:
        sizes = ndi.sum(m, lab, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1
        m = np.isin(lab, keep)
    return m


def rss_noise_median_factor(channels: int) -> float:
    """median(RSS of ``channels`` noise channels) / per-channel noise std sqrt(E|n|^2)."""
    return float(np.sqrt(scipy.stats.chi2.ppf(0.5, 2 * channels) / 2))


@register
class ImageQC(AccumulatingGadget):
    """QC tap on combined images; place it after CoilCombine, before ImageFinish.

    Per z plane of each ``(1, z, y, x)`` image (x = readout, y = phase encoding):

    * object mask: Otsu threshold, 3x3 opening, holes filled, specks dropped;
      background = outside the mask dilated by ``margin_px``;
    * noise: per-channel noise std ``sigma`` from the median background magnitude, corrected
      for the chi distribution of the RSS of ``N`` channels (N from the noise scan,
      ``context.shared["noise"]``, else the header's receiverChannels; 1 for complex images).
      Without a noise scan the channels are not prewhitened and correlated noise makes this
      estimate high (+35% on simulate_scan); ``effective_channels=True`` in :meth:`measure`
      moment-matches N from the background instead (off: it misjudges structured backgrounds);
    * ``low_snr``: ``mean(sqrt(max(rss^2 - N sigma^2, 0))) / sigma`` over the object eroded by
      ``snr_erosion_mm`` (the
      noise bias of RSS removed) below ``snr_warning`` / ``snr_critical``. With the noise
      scan's covariance ``C`` known (images prewhitened), the estimate is divided by
      ``sqrt(tr(C^-1) mean(diag C) / N)``, so it is the SNR of the unwhitened RSS image
      over the mean channel's noise, the convention of :func:`inline.simulate.simulate_scan`;
    * ``ghosting``: the background is fitted as ``a * object shifted by FOV/2 along PE + b``;
      ``a`` (ghost-to-signal ratio) above ``ghost_threshold``;
    * ``motion``: mean background in the PE band (columns of the object, outside it) minus
      that in the readout band (rows of the object, outside it), after removing the fitted
      N/2 ghost, over the object mean, above ``motion_threshold``.
    """

    class Params(GadgetParams):
        snr_warning: float = Field(
            10.0, gt=0, description="SNR below which a warning is raised (diagnostic 2D brain imaging runs at 20+)."
        )
        snr_critical: float = Field(5.0, gt=0, description="SNR below which the alert is critical.")
        snr_erosion_mm: float = Field(
            6.0,
            ge=0,
            description="The SNR's signal is the mean over the object mask eroded by this distance [mm] (about one "
            "or two pixels): the partial-volume rim and scalp are left out; within 8% of the brain-mask SNR of "
            "simulate_scan slices (10 mm erodes too much: the dim centre of an RSS image dominates, -20%).",
        )
        ghost_threshold: float = Field(
            0.05,
            gt=0,
            description="N/2 ghost-to-signal ratio above which ghosting is reported (ACR QA passes EPI GSR < 3%).",
        )
        motion_threshold: float = Field(
            0.04,
            gt=0,
            description="Excess PE-band background over readout-band background, relative to the object mean "
            "(clean images: |value| < 0.01; visible motion ghosts: > 0.05).",
        )
        margin_px: int = Field(3, ge=0, description="Dilation of the object mask before taking the background [pixels].")
        min_background_fraction: float = Field(
            0.05, gt=0, lt=1, description="Fewer background pixels than this fraction of the image: skip the checks."
        )

    accepts: ClassVar[tuple[type, ...]] = (ImageBuffer,)
    tap: ClassVar[bool] = True  # runs beside the data path: never delays the images
    emits: ClassVar[tuple[type, ...]] = (ImageBuffer, Alert)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self.alerts = AlertFactory(context)
        self._emitted: set[tuple] = set()
        #: metrics of the last image, per z plane (for tests and the dashboard)
        self.last_metrics: list[dict] = []

    def _channels(self, item: ImageBuffer) -> int:
        if np.iscomplexobj(item.data):
            return 1  # a complex (Walsh / SENSE) combination has Gaussian noise
        noise = self.context.shared.get("noise")
        if noise is not None:
            return int(noise["channels"])
        asi = getattr(self.header, "acquisitionSystemInformation", None)
        return int(getattr(asi, "receiverChannels", None) or 1)

    def _whitening_factor(self, channels: int) -> float:
        noise = self.context.shared.get("noise")
        if noise is None or channels <= 1:
            return 1.0
        cov = np.asarray(noise["covariance"])
        diag = np.real(np.diag(cov))
        if cov.shape[0] != channels or np.any(diag <= 0):
            return 1.0
        try:
            inv = np.linalg.inv(cov)
        except np.linalg.LinAlgError:
            return 1.0
        return float(np.sqrt(max(np.real(np.trace(inv)) * diag.mean() / channels, 1e-12)))

    def measure(
        self, mag: np.ndarray, channels: int, whitening: float, erode_px: int = 0, effective_channels: bool = False
    ) -> dict | None:
        """Metrics of one ``(y, x)`` magnitude plane; None when there is too little background."""
        p = self.params
        ny, nx = mag.shape
        mask = object_mask(mag, p.margin_px)
        if not mask.any():
            # no object distinguishable from the noise: noise-dominated (e.g. raised noise x16 on a phantom
            # filling 3/4 of the FOV), an SNR of ~0 for low_snr rather than no measurement
            return {
                "snr": 0.0, "noise_std": float(np.median(mag)) / rss_noise_median_factor(channels), "object_mean": 0.0,
                "ghost_ratio": 0.0, "motion_index": 0.0, "object_fraction": 0.0, "channels": channels,
                "whitening_factor": whitening,
            }
        grown = ndi.binary_dilation(mask, iterations=p.margin_px) if p.margin_px else mask
        bg = ~grown
        if bg.sum() < p.min_background_fraction * mag.size:
            return None
        obj_mean = float(mag[mask].mean())
        if effective_channels and channels > 1:
            # unwhitened, correlated channels: RSS^2 ~ gamma with N_eff = mean^2 / var (moment match)
            b2 = mag[bg].astype(np.float64) ** 2
            channels = int(np.clip(round(b2.mean() ** 2 / max(b2.var(), 1e-30)), 1, channels))
        med = float(np.median(mag[bg]))
        sigma = med / rss_noise_median_factor(channels)
        interior = ndi.binary_erosion(mask, iterations=erode_px) if erode_px else mask
        if interior.sum() < 0.25 * mask.sum():
            interior = mask
        sq = mag[interior].astype(np.float64) ** 2 - channels * sigma**2
        snr = float(np.sqrt(np.maximum(sq, 0)).mean() / max(sigma, 1e-30)) / whitening
        # N/2 ghost: least-squares fit of the background against the object shifted by FOV/2
        shifted = np.roll(np.where(mask, mag, 0), ny // 2, axis=0)
        region = bg & (shifted > 0)
        ghost = 0.0
        fit = np.zeros_like(mag)
        if region.sum() > 16:
            x = shifted[bg]
            y = mag[bg]
            xc = x - x.mean()
            var = float(np.dot(xc, xc))
            if var > 0:
                a = float(np.dot(xc, y - y.mean()) / var)
                ghost = max(a, 0.0)
                fit[bg] = ghost * x
        # motion: background along PE (object columns) vs along readout (object rows)
        cols = mask.any(axis=0)
        rows = mask.any(axis=1)
        pe_band = bg & cols[None, :]
        ro_band = bg & rows[:, None] & ~cols[None, :]
        resid = mag - fit
        if pe_band.sum() > 16 and ro_band.sum() > 16:
            ref = float(np.median(resid[ro_band]))
            motion = (float(resid[pe_band].mean()) - ref) / max(obj_mean, 1e-30)
        else:
            ref = med
            motion = 0.0
        return {
            "snr": snr, "noise_std": sigma, "object_mean": obj_mean, "ghost_ratio": ghost, "motion_index": motion,
            "object_fraction": float(mask.mean()), "channels": channels, "whitening_factor": whitening,
        }

    def process(self, item: ImageBuffer, trace: Trace) -> Iterator[Output]:
        yield item, trace  # the tap: the image first, QC after
        data = to_host(item.data)
        if data.ndim != 4 or data.shape[-1] < 16 or data.shape[-2] < 16:
            return
        channels = self._channels(item)
        whitening = self._whitening_factor(channels) if not np.iscomplexobj(item.data) else 1.0
        mag = np.abs(data[0]) if data.shape[0] == 1 else np.sqrt((np.abs(data) ** 2).sum(axis=0))
        s, rep = int(item.index.slice), int(item.index.repetition)
        ny = mag.shape[-2]
        pixel_mm = float(item.field_of_view_mm[1]) / ny if item.field_of_view_mm[1] > 0 else 1.0
        erode_px = int(round(self.params.snr_erosion_mm / pixel_mm)) if pixel_mm > 0 else 0
        metrics = [self.measure(plane.astype(np.float32, copy=False), channels, whitening, erode_px) for plane in mag]
        self.last_metrics = [m for m in metrics if m is not None]
        if not self.last_metrics:
            return
        snr = float(np.median([m["snr"] for m in self.last_metrics]))
        ghost = float(np.median([m["ghost_ratio"] for m in self.last_metrics]))
        motion = float(np.median([m["motion_index"] for m in self.last_metrics]))
        evidence = {k: round(float(np.median([m[k] for m in self.last_metrics])), 4) for k in self.last_metrics[0]}
        p = self.params
        where = f"series {self.alerts.series}, {slice_label([s])}, repetition {rep}"
        common = dict(revealed_ns=trace.last_arrival_ns, slices=[s], repetition=rep, evidence=evidence)
        noisy = snr < p.snr_critical  # noise-dominated: the mask and bands are unreliable, low_snr says it all
        if not noisy and ghost > p.ghost_threshold and self._once(AlertCode.GHOSTING, s, rep):
            yield self.alerts.make(
                AlertCode.GHOSTING, Severity.CRITICAL if ghost > 3 * p.ghost_threshold else Severity.WARNING,
                f"N/2 ghosting in {where}: ghost-to-signal ratio {100 * ghost:.1f}%.",
                "Check the images; repeat the series (if it persists, re-run the adjustments / shim and call service: "
                "EPI phase correction or gradient delays).",
                value=ghost, threshold=p.ghost_threshold, unit="ghost/signal", **common,
            ), trace
        if not noisy and motion > p.motion_threshold and self._once(AlertCode.MOTION, s, rep):
            yield self.alerts.make(
                AlertCode.MOTION, Severity.CRITICAL if motion > 3 * p.motion_threshold else Severity.WARNING,
                f"Motion in {where}: ghosting along phase encoding at {100 * motion:.1f}% of the object signal.",
                "Ask the patient to keep still and repeat the series.",
                value=motion, threshold=p.motion_threshold, unit="PE excess/object mean", **common,
            ), trace
        if snr < p.snr_warning and self._once(AlertCode.LOW_SNR, s, rep):
            yield self.alerts.make(
                AlertCode.LOW_SNR, Severity.CRITICAL if snr < p.snr_critical else Severity.WARNING,
                f"Low SNR in {where}: {snr:.1f} (threshold {p.snr_warning:g}).",
                "Check that the right coil is connected and selected and positioned over the anatomy; repeat with more "
                "averages or a larger voxel if the images are too noisy to read.",
                value=snr, threshold=p.snr_warning, unit="mean signal/noise std", **common,
            ), trace

    def _once(self, *key) -> bool:
        if key in self._emitted:
            return False
        self._emitted.add(key)
        return True
