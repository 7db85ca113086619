"""Quality thresholds of the shipped DL reconstruction (E2E-VarNet) on held-out data.

What the shipped model achieves, asserted as NRMSE relations and bounds measured with it:

* DL better than zero-filling at every R in {4, 6, 8, 12} (below half its NRMSE);
* DL (the network, then the closing CG-SENSE step of :mod:`gadgets.dl_refine`, as ``DLRecon``
  runs it) better than CG-SENSE at every R (R = 4: 0.037 vs 0.048; the network alone, 0.065, was not);
* DL at R = 6 within 2.2x and at R = 8 within 2.5x the NRMSE of CS at R = 4 (measured 1.8x and 2.1x;
  the network alone: 2.4x and 2.6x);
* on a real fully sampled phantom scan (retrospectively undersampled, R = 4), DL bounded.

The reader-study ordering the issue asks for (DL at R = 6 no worse than CS at R = 4, DL at
R = 8 within 5 % of it) is NOT met by this model (a ~1 M-parameter network trained for one
hour on one CPU thread): ``bench/dl_eval.py`` reports it and the model card states it; the
issue stays open until a model meets it, and then these bounds tighten to the study's.

Every method gets the same 8-virtual-coil k-space; scores, scale fit and the SENSE/CS
settings (tuned on training-region slices) are those of :mod:`models.evaluate`. Held-out
data: 6 slices from the test region of the MNI152 simulation (3 orientations, 3
contrasts, other coil/phase/noise seeds than training), 128 x 128, SNR 40. Means over the
slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the DL reconstruction needs torch (pip install inline[dl])")
pytest.importorskip("skimage", reason="the metrics need scikit-image (pip install inline[dl])")

from models import evaluate as ev  # noqa: E402
from models.data import make_bank  # noqa: E402

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "models" / "weights" / "varnet_mni152.pt"
ACCELERATIONS = (4, 6, 8, 12)
#: (orientation, contrast) volumes of the held-out slices; 2 slices from each
VOLUMES = (("axial", "t1w"), ("sagittal", "t2w"), ("coronal", "pd"))
REAL_FILE = "pulseq_gre_16ch_128_phantom.h5"


@pytest.fixture(scope="module")
def net():
    assert WEIGHTS.is_file(), f"the shipped DL weights are missing: {WEIGHTS}"
    import torch

    torch.manual_seed(0)
    return ev.load_varnet(WEIGHTS)[0]


@pytest.fixture(scope="module")
def held_out_nrmse(net) -> dict[tuple[str, int], float]:
    """Mean NRMSE per (method, R) over the 6 held-out slices (CS at R = 4 only)."""
    scores: dict[tuple[str, int], list[float]] = {}
    for orientation, contrast in VOLUMES:
        bank = make_bank(128, split="test", slices=20, seeds=(7,), orientations=(orientation,), contrasts=(contrast,))
        assert len(bank) >= 2 and np.all(np.abs(bank.position) <= 0.1)
        for i in (0, len(bank) - 1):
            for r in ACCELERATIONS:
                case = ev.simulated_case(bank, i, r, snr=40.0, seed=7)
                methods = ("zero-filled", "SENSE", "DL") + (("CS",) if r == 4 else ())
                support = ev.object_support(case.reference)
                for m, image in ev.reconstruct(case, methods, net).items():
                    scores.setdefault((m, r), []).append(ev.score(image, case.reference, support).nrmse)
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    print("\nheld-out NRMSE (6 slices): " + ", ".join(f"{m} R{r} {v:.4f}" for (m, r), v in sorted(means.items())))
    return means


def test_dl_distance_to_cs_at_r4(held_out_nrmse):
    # regression bounds (measured with sha256 ec3eff16... and the SENSE step: CS R=4 0.032, DL R=6 0.059, R=8 0.068)
    cs4 = held_out_nrmse["CS", 4]
    assert held_out_nrmse["DL", 6] < 2.2 * cs4
    assert held_out_nrmse["DL", 8] < 2.5 * cs4


@pytest.mark.parametrize("r", ACCELERATIONS)
def test_dl_beats_zero_filled(held_out_nrmse, r):
    dl, zf = held_out_nrmse["DL", r], held_out_nrmse["zero-filled", r]
    assert dl < 0.5 * zf, f"R={r}: NRMSE DL {dl:.4f} not below half of zero-filled {zf:.4f}"


@pytest.mark.parametrize("r", ACCELERATIONS)
def test_dl_beats_sense(held_out_nrmse, r):
    dl, sense = held_out_nrmse["DL", r], held_out_nrmse["SENSE", r]
    assert dl < sense, f"R={r}: NRMSE DL {dl:.4f} >= SENSE {sense:.4f}"


def test_dl_on_a_real_phantom_scan_is_bounded(real_phantom_scores):
    # out of distribution (phantom, 128 x 64): measured NRMSE 0.209 (zero-filled 0.143); a
    # broken model or pipeline gives > 0.5
    assert real_phantom_scores["DL"].nrmse < 0.3
    assert real_phantom_scores["DL"].ssim > 0.3


@pytest.fixture(scope="module")
def real_phantom_scores(net, shared_data):
    path = shared_data / REAL_FILE
    if not path.exists():
        pytest.skip(f"{REAL_FILE} not in {shared_data}")
    ((name, full),) = ev.load_fully_sampled(path)
    case = ev.undersample(full, 4, name)
    support = ev.object_support(case.reference)
    scores = {m: ev.score(im, case.reference, support) for m, im in ev.reconstruct(case, ("zero-filled", "DL"), net).items()}
    print(f"\n{name} R=4: " + ", ".join(f"{m} NRMSE {s.nrmse:.4f} PSNR {s.psnr:.2f} SSIM {s.ssim:.4f}" for m, s in scores.items()))
    return scores
