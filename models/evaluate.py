"""Image-quality evaluation of the DL reconstruction (:mod:`models.varnet`) against
zero-filling, CG-SENSE and L1-wavelet compressed sensing on the same undersampled k-space.

Every method gets the same input, the DL network's: one 2D slice of ``VIRTUAL_COILS``
compressed coils, undersampled along ky with the equispaced pattern plus the centre ACS
lines (:func:`models.data.equispaced_mask`), divided by :func:`models.data.input_scale`.
So the only difference between the rows of a table is the method:

* zero-filled: root-sum-of-squares of the zero-filled coil images;
* SENSE: ESPIRiT maps from the ACS lines (:func:`gadgets.espirit.espirit_maps`) and CG on
  ``(A^H A + lambda I) x = A^H y`` (:func:`gadgets.sense.sense_cg`);
* CS: the same maps, ``1/2 ||A x - y||^2 + lambda ||W x||_1`` by FISTA with BART's
  wavelet and scaling (:class:`gadgets.cs.SenseL1Wavelet`, ``bart pics -l1`` equivalent);
* DL: the E2E-VarNet's k-space after the closing CG-SENSE step (:mod:`gadgets.dl_refine`), RSS image;
  "DL (network only)": the network's own RSS image (:meth:`models.varnet.VarNet.image`).

Metrics (:func:`score`), against the RSS of the fully sampled k-space of the same coils
and the same noise (``reference``):

* magnitude images only (SENSE and CS give one complex image with unit-norm maps);
* scale: as ``bench/accel_sense.py`` and ``bench/accel_cs.py`` do, one real factor per
  image and method, fitted by least squares to the reference over the object support
  (:func:`object_support`), then applied to the whole image -- to every method alike, the
  DL and zero-filled images included, so no method gains from its intensity scale;
* all three over the object support only (the accel benches' NRMSE region): outside it
  the reference is receiver noise, which no method can (or should) reproduce, and the
  ESPIRiT crop sets SENSE and CS to 0 there while zero-filling keeps it -- counting it would
  reward noise;
* NRMSE ``||s|x| - ref|| / ||ref||``; PSNR ``10 log10(max(ref)^2 / MSE)`` and SSIM
  (``skimage.metrics``, 7 x 7 uniform window, the SSIM map computed on the whole image and
  averaged over the support), both with ``data_range = reference.max()``.

Regularisation of SENSE (Tikhonov ``lambda``, CG iterations) and CS (``lambda``, FISTA
iterations) is chosen per acceleration by :func:`tune` on *training*-region slices
(``make_bank(split="train")``), never on the test slices; the values found are recorded
in :data:`SENSE_SETTINGS` and :data:`CS_SETTINGS` (``python bench/dl_eval.py`` re-runs the
sweep and reports whether it still agrees). ESPIRiT uses the SENSE gadget's defaults
(:data:`ESPIRIT`: 6 x 6 kernel, crop 0.8), not tuned. Known limit: with few ACS lines
(8 on a 64-line scan) or an object that fills the field of view, as in the real phantom
scans, the crop removes parts of the object and SENSE/CS fall below zero-filling there.

Real scans (:func:`load_fully_sampled`): fully sampled Cartesian 2D ISMRMRD files are
prewhitened when they carry a noise measurement, readout oversampling is removed (encoded
/ recon FOV x), channels are compressed to ``VIRTUAL_COILS`` from the centre lines, as
:func:`models.data.make_bank` does, and retrospectively undersampled like the simulation.

Axes: k-space and coil images ``(coils, ky, kx)`` complex64, images ``(y, x)`` float32,
masks ``(ky,)`` bool.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

# ESPIRiT settings (the SENSE gadget's defaults), shared by SENSE, CS and DL's closing SENSE step
from gadgets.dl_refine import ESPIRIT, ESPIRIT_CALIB_WIDTH
from models.data import (
    VIRTUAL_COILS, Bank, Sample, acs_lines_for, equispaced_mask, ifft2c, input_scale, make_sample, rss,
)

__all__ = [
    "METHODS", "ESPIRIT", "ESPIRIT_CALIB_WIDTH", "Case", "Metrics", "SenseSettings", "CSSettings", "SENSE_SETTINGS", "CS_SETTINGS",
    "case_from_sample", "simulated_case", "undersample", "load_fully_sampled", "real_cases",
    "coil_maps", "zero_filled", "sense", "cs", "dl", "load_varnet", "sha256",
    "object_support", "fit_scale", "score", "reconstruct", "Result", "evaluate", "tune",
]

METHODS = ("zero-filled", "SENSE", "CS", "DL (network only)", "DL")
#: "DL" is what ``DLRecon`` gives (the network, then the closing SENSE step of
#: :mod:`gadgets.dl_refine`); "DL (network only)" the network's own image, for comparison.

#: Object support: the smoothed reference above this fraction of its maximum.
SUPPORT_FRACTION = 0.1


@dataclass(frozen=True)
class SenseSettings:
    """CG-SENSE regularisation: Tikhonov ``lambda_l2`` (on images scaled by ``input_scale``,
    BART ``pics -l2 -r``) and the most CG ``iterations`` (stopping early at relative residual
    ``tolerance``)."""

    lambda_l2: float
    iterations: int
    tolerance: float = 1e-3


@dataclass(frozen=True)
class CSSettings:
    """L1-wavelet CS: ``lam`` (BART ``pics -l1 -r`` convention, after BART's data scaling)
    and FISTA ``iterations``."""

    lam: float
    iterations: int


#: Chosen by :func:`tune` (grids :data:`SENSE_GRID`, :data:`CS_GRID`) on 6 training-region
#: slices (``make_bank(128, split="train", slices=10, seeds=(3,))``, 3 orientations and 3
#: contrasts, SNR 40; ``bench/dl_eval.py`` repeats the sweep). Mean NRMSE of the choice on
#: those slices: SENSE 0.041 / 0.104 / 0.152 / 0.173, CS 0.026 / 0.055 / 0.091 / 0.116 at
#: R = 4 / 6 / 8 / 12.
SENSE_SETTINGS: dict[int, SenseSettings] = {
    4: SenseSettings(0.003, 10),
    6: SenseSettings(0.003, 40),
    8: SenseSettings(0.003, 40),
    12: SenseSettings(0.003, 40),
}
CS_SETTINGS: dict[int, CSSettings] = {
    4: CSSettings(0.002, 100),
    6: CSSettings(0.001, 300),
    8: CSSettings(0.001, 300),
    12: CSSettings(0.001, 300),
}


# -- inputs ------------------------------------------------------------------------------
@dataclass
class Case:
    """One undersampled slice as every method sees it.

    Attributes:
        kspace: ``(coils, ky, kx)`` complex64, zeros at unsampled lines, divided by ``scale``.
        sampled: ``(ky,)`` bool, lines measured (ACS included).
        acs: ``(ky,)`` bool, the fully sampled calibration lines.
        reference: ``(y, x)`` float32, RSS of the fully sampled k-space, divided by ``scale``.
        acceleration: R of the equispaced pattern.
        scale: :func:`models.data.input_scale` of the undersampled k-space.
        name: where the slice came from.
    """

    kspace: np.ndarray
    sampled: np.ndarray
    acs: np.ndarray
    reference: np.ndarray
    acceleration: int
    scale: float
    name: str = ""


def case_from_sample(sample: Sample, name: str = "") -> Case:
    """The scaled :class:`Case` of a :class:`models.data.Sample` (as ``train_varnet.to_tensors`` scales)."""
    scale = input_scale(sample.kspace, sample.acs)
    return Case(
        kspace=(sample.kspace / scale).astype(np.complex64), sampled=sample.sampled, acs=sample.acs,
        reference=(sample.target / scale).astype(np.float32), acceleration=sample.acceleration, scale=scale, name=name,
    )


def simulated_case(bank: Bank, index: int, acceleration: int, snr: float = 40.0, seed: int = 0) -> Case:
    """Slice ``index`` of ``bank`` at R = ``acceleration``, no augmentation, pattern offset 0.

    The noise depends on ``(seed, index)`` only, so the cases of one slice at different R
    share the fully sampled k-space and the reference.
    """
    rng = np.random.default_rng((seed, index))
    sample = make_sample(bank, index, acceleration, rng, snr=snr, augment=False)
    name = f"{bank.orientation[index]}/{bank.contrast[index]}/{bank.position[index]:+.4f}"
    return case_from_sample(sample, name)


def undersample(full: np.ndarray, acceleration: int, name: str = "", acs_lines: int | None = None) -> Case:
    """Retrospectively undersample fully sampled ``(coils, ky, kx)`` k-space like :func:`make_sample`."""
    ny = full.shape[1]
    sampled, acs = equispaced_mask(ny, acceleration, acs_lines_for(ny) if acs_lines is None else acs_lines)
    kspace = np.where(sampled[None, :, None], full, 0).astype(np.complex64)
    sample = Sample(kspace, full, sampled, acs, rss(ifft2c(full)), acceleration)
    return case_from_sample(sample, name)


def _prewhitening(noise: np.ndarray) -> np.ndarray:
    """``(coils, coils)`` whitening matrix from ``(coils, samples)`` noise (BART ``whiten``,
    Gadgetron NoiseAdjust without its bandwidth scale: a global factor, removed by the scaling)."""
    cov = noise @ noise.conj().T / max(noise.shape[1] - 1, 1)
    return np.linalg.inv(np.linalg.cholesky(cov)).astype(np.complex64)


def _remove_readout_oversampling(k: np.ndarray, ratio: float) -> np.ndarray:
    """Keep the central ``nx / ratio`` image columns of ``(..., kx)`` k-space (as the
    RemoveReadoutOversampling gadget: centred orthonormal FFTs along the readout)."""
    nx = k.shape[-1]
    m = int(round(nx / ratio))
    if ratio <= 1.0 + 1e-3 or m >= nx:
        return k
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, axes=-1), axis=-1, norm="ortho"), axes=-1)
    img = img[..., nx // 2 - m // 2: nx // 2 - m // 2 + m]
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1, norm="ortho"), axes=-1).astype(np.complex64)


def load_fully_sampled(path: str | Path, virtual_coils: int = VIRTUAL_COILS) -> list[tuple[str, np.ndarray]]:
    """The fully sampled 2D k-spaces of an ISMRMRD file, ready for :func:`undersample`.

    One ``(name, kspace)`` per (slice, repetition, contrast, average); ``kspace``
    ``(virtual_coils, ky, kx)`` complex64: prewhitened with the file's noise measurement if
    it has one, readout oversampling removed, compressed to ``virtual_coils`` coils from the
    central ``acs_lines_for(ky)`` lines (as :func:`models.data.make_bank`).

    Raises:
        ValueError: the file has a missing ky line (not fully sampled) or is not 2D Cartesian.
    """
    import ismrmrd

    from inline.coils import compress, compression_matrix
    from inline.mrdfile import read_scan

    path = Path(path)
    scan = read_scan(path)
    header = ismrmrd.xsd.CreateFromDocument(scan.header_xml)
    enc = header.encoding[0]
    ratio = float(enc.encodedSpace.fieldOfView_mm.x) / float(enc.reconSpace.fieldOfView_mm.x or enc.encodedSpace.fieldOfView_mm.x)
    if enc.encodedSpace.matrixSize.z > 1:
        raise ValueError(f"{path.name}: 3D encoding; only 2D scans are evaluated")
    acqs = scan.acquisitions
    noise = [a.data for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    whiten = _prewhitening(np.concatenate(noise, axis=1)) if noise else None
    skip = (ismrmrd.ACQ_IS_NOISE_MEASUREMENT, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, ismrmrd.ACQ_IS_NAVIGATION_DATA,
            ismrmrd.ACQ_IS_PHASECORR_DATA)
    groups: dict[tuple[int, ...], dict[int, np.ndarray]] = {}
    for a in acqs:
        if any(a.is_flag_set(f) for f in skip) or a.trajectory_dimensions > 0:
            continue
        key = (a.idx.slice, a.idx.repetition, a.idx.contrast, a.idx.average)
        groups.setdefault(key, {})[a.idx.kspace_encode_step_1] = a.data
    out = []
    for key, lines in sorted(groups.items()):
        ny = max(lines) + 1
        if len(lines) != ny:
            raise ValueError(f"{path.name} {key}: {len(lines)} of {ny} ky lines; not fully sampled")
        k = np.stack([lines[y] for y in range(ny)], axis=1).astype(np.complex64)  # (coils, ky, kx)
        if whiten is not None:
            k = np.einsum("dc,c...->d...", whiten, k).astype(np.complex64)
        k = _remove_readout_oversampling(k, ratio)
        n = acs_lines_for(ny)
        centre = k[:, ny // 2 - n // 2: ny // 2 + n // 2]
        k = compress(k, compression_matrix(centre, virtual_coils))
        out.append((f"{path.stem}/slice{key[0]}/rep{key[1]}", k))
    return out


def real_cases(
    files: Iterable[str | Path], accelerations: Sequence[int], virtual_coils: int = VIRTUAL_COILS
) -> list[Case]:
    """:class:`Case` s of every fully sampled image of ``files`` at each R in ``accelerations``."""
    cases = []
    for f in files:
        for name, k in load_fully_sampled(f, virtual_coils):
            cases.extend(undersample(k, r, name) for r in accelerations)
    return cases


# -- methods ---------------------------------------------------------------------------
def coil_maps(case: Case) -> np.ndarray:
    """ESPIRiT maps ``(coils, y, x)`` complex64 (unit norm inside the crop, 0 outside) from the ACS lines."""
    from gadgets.dl_refine import refine_maps

    return refine_maps(case.kspace, case.acs, grid=ESPIRIT["grid"])


def zero_filled(case: Case) -> np.ndarray:
    """RSS of the zero-filled coil images ``(y, x)``."""
    return rss(ifft2c(case.kspace))


def sense(case: Case, maps: np.ndarray, settings: SenseSettings) -> np.ndarray:
    """``|x|`` ``(y, x)`` of CG-SENSE with ``maps`` ``(coils, y, x)``."""
    from gadgets.sense import SenseOperator, sense_cg

    op = SenseOperator.from_maps(maps[:, None])
    result = sense_cg(case.kspace[:, None], case.sampled[None], op, settings.lambda_l2, settings.iterations, settings.tolerance)
    return np.abs(result.image[0]).astype(np.float32)


def cs(case: Case, maps: np.ndarray, settings: CSSettings) -> np.ndarray:
    """``|x|`` ``(y, x)`` of L1-wavelet CS with ``maps`` ``(coils, y, x)``."""
    from gadgets.cs import SenseL1Wavelet

    op = SenseL1Wavelet(maps[:, None], case.sampled[None])
    return np.abs(op.solve(case.kspace[:, None], settings.lam, settings.iterations).image[0]).astype(np.float32)


def dl(case: Case, net, refine: bool = True) -> np.ndarray:
    """The RSS image ``(y, x)`` of the VarNet's k-space, after the closing CG-SENSE step
    (:mod:`gadgets.dl_refine` with its own maps and settings, as ``DLRecon`` runs it) unless
    ``refine`` is False."""
    import torch

    from gadgets.dl_refine import refine_maps, sense_refine

    k = torch.from_numpy(np.ascontiguousarray(case.kspace))[None]
    mask = torch.from_numpy(case.sampled.astype(np.float32)).view(1, 1, -1, 1)
    acs = torch.from_numpy(case.acs.astype(np.float32)).view(1, 1, -1, 1)
    with torch.inference_mode():
        kspace = net(k, mask, acs)[0].numpy().astype(np.complex64)
    if refine:
        kspace, _ = sense_refine(kspace, case.kspace, case.sampled, refine_maps(case.kspace, case.acs))
    return rss(ifft2c(kspace)).astype(np.float32)


def load_varnet(path: str | Path):
    """``(net, meta)``: the :class:`models.varnet.VarNet` of a checkpoint, in eval mode on the CPU."""
    import torch

    from models.varnet import VarNet

    from torch.torch_version import TorchVersion

    # weights_only: no code from the file runs; the final checkpoint's meta holds torch.__version__
    with torch.serialization.safe_globals([TorchVersion]):
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    net = VarNet(**ckpt["config"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), dict(ckpt.get("meta", {}))


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- metrics ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Metrics:
    """Scores of one image over the object support, after the fitted ``scale`` (see the
    module docstring): ``nrmse``, ``psnr`` [dB], ``ssim``."""

    nrmse: float
    psnr: float
    ssim: float
    scale: float


def object_support(reference: np.ndarray) -> np.ndarray:
    """``(y, x)`` bool: the object -- the reference smoothed (Gaussian, sigma 2 px) above
    :data:`SUPPORT_FRACTION` of its maximum, holes filled (noise-only background excluded)."""
    smooth = ndimage.gaussian_filter(reference.astype(np.float64), 2.0)
    return ndimage.binary_fill_holes(smooth > SUPPORT_FRACTION * smooth.max())


def fit_scale(image: np.ndarray, reference: np.ndarray, support: np.ndarray) -> float:
    """Least-squares ``s`` minimising ``||s |image| - reference||`` over ``support``."""
    a, t = np.abs(image)[support].astype(np.float64), reference[support].astype(np.float64)
    aa = float(a @ a)
    return float(a @ t) / aa if aa > 0 else 1.0


def score(image: np.ndarray, reference: np.ndarray, support: np.ndarray | None = None) -> Metrics:
    """NRMSE, PSNR and SSIM of ``|image|`` against ``reference`` after the fitted scale."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if support is None:
        support = object_support(reference)
    ref = reference.astype(np.float64)
    s = fit_scale(image, ref, support)
    x = s * np.abs(image).astype(np.float64)
    nrmse = float(np.linalg.norm(x[support] - ref[support]) / np.linalg.norm(ref[support]))
    data_range = float(ref.max())
    _, ssim_map = structural_similarity(ref, x, data_range=data_range, full=True)
    return Metrics(
        nrmse=nrmse,
        psnr=float(peak_signal_noise_ratio(ref[support], x[support], data_range=data_range)),
        ssim=float(ssim_map[support].mean()),
        scale=s,
    )


# -- evaluation ------------------------------------------------------------------------
def reconstruct(
    case: Case, methods: Sequence[str] = METHODS, net=None, maps: np.ndarray | None = None,
    sense_settings: SenseSettings | None = None, cs_settings: CSSettings | None = None,
) -> dict[str, np.ndarray]:
    """``{method: (y, x) magnitude image}`` of ``case`` (settings default to the recorded ones for its R).

    Raises:
        ValueError: an unknown method, or DL without ``net``.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    r = case.acceleration
    if ("SENSE" in methods or "CS" in methods) and maps is None:
        maps = coil_maps(case)
    out = {}
    for m in methods:
        if m == "zero-filled":
            out[m] = zero_filled(case)
        elif m == "SENSE":
            out[m] = sense(case, maps, sense_settings or SENSE_SETTINGS[r])
        elif m == "CS":
            out[m] = cs(case, maps, cs_settings or CS_SETTINGS[r])
        else:
            if net is None:
                raise ValueError("DL needs the network (load_varnet)")
            out[m] = dl(case, net, refine=m == "DL")
    return out


@dataclass
class Result:
    """Per-case scores: ``scores[method]`` lists :class:`Metrics` in ``cases`` order."""

    cases: list[str] = field(default_factory=list)
    scores: dict[str, list[Metrics]] = field(default_factory=dict)

    def mean(self, method: str, metric: str = "nrmse") -> float:
        return float(np.mean([getattr(m, metric) for m in self.scores[method]]))

    def std(self, method: str, metric: str = "nrmse") -> float:
        return float(np.std([getattr(m, metric) for m in self.scores[method]]))


def evaluate(
    cases: Iterable[Case], methods: Sequence[str] = METHODS, net=None,
    sense_settings: dict[int, SenseSettings] | None = None, cs_settings: dict[int, CSSettings] | None = None,
) -> dict[int, Result]:
    """Score every method on every case; ``{R: Result}``. Settings per R default to
    :data:`SENSE_SETTINGS` / :data:`CS_SETTINGS`."""
    sense_settings = SENSE_SETTINGS if sense_settings is None else sense_settings
    cs_settings = CS_SETTINGS if cs_settings is None else cs_settings
    results: dict[int, Result] = {}
    for case in cases:
        r = case.acceleration
        res = results.setdefault(r, Result(scores={m: [] for m in methods}))
        support = object_support(case.reference)
        images = reconstruct(case, methods, net, sense_settings=sense_settings.get(r), cs_settings=cs_settings.get(r))
        res.cases.append(case.name)
        for m in methods:
            res.scores[m].append(score(images[m], case.reference, support))
    return results


#: Sweep grids of :func:`tune`.
SENSE_GRID = dict(lambda_l2=(0.0, 0.001, 0.003, 0.01, 0.03, 0.1), iterations=(5, 10, 20, 40))
CS_GRID = dict(lam=(0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02), iterations=(30, 100, 300))


def tune(
    cases: Sequence[Case], progress: Callable[[str], None] | None = None,
) -> tuple[dict[int, SenseSettings], dict[int, CSSettings], dict[int, dict]]:
    """Per R, the SENSE and CS settings of :data:`SENSE_GRID` / :data:`CS_GRID` with the
    lowest mean NRMSE over ``cases`` (training-region slices). Returns the chosen settings
    and, per R, the mean NRMSE of every grid point (``"sense"``/``"cs"``: list of
    ``[params..., nrmse]``)."""
    by_r: dict[int, list[Case]] = {}
    for c in cases:
        by_r.setdefault(c.acceleration, []).append(c)
    sense_best, cs_best, table = {}, {}, {}
    for r, group in sorted(by_r.items()):
        prepared = [(c, coil_maps(c), object_support(c.reference)) for c in group]

        def mean_nrmse(fn) -> float:
            return float(np.mean([score(fn(c, maps), c.reference, sup).nrmse for c, maps, sup in prepared]))

        rows_sense = []
        for lam, it in itertools.product(SENSE_GRID["lambda_l2"], SENSE_GRID["iterations"]):
            s = SenseSettings(lam, it)
            rows_sense.append((s, mean_nrmse(lambda c, m, s=s: sense(c, m, s))))
        rows_cs = []
        for lam, it in itertools.product(CS_GRID["lam"], CS_GRID["iterations"]):
            s = CSSettings(lam, it)
            rows_cs.append((s, mean_nrmse(lambda c, m, s=s: cs(c, m, s))))
        sense_best[r] = min(rows_sense, key=lambda t: t[1])[0]
        cs_best[r] = min(rows_cs, key=lambda t: t[1])[0]
        table[r] = {
            "sense": [[s.lambda_l2, s.iterations, e] for s, e in rows_sense],
            "cs": [[s.lam, s.iterations, e] for s, e in rows_cs],
        }
        if progress is not None:
            progress(f"R={r}: SENSE {sense_best[r]}, CS {cs_best[r]}")
    return sense_best, cs_best, table
