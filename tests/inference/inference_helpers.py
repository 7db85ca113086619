"""Shared fixtures and data of the inference tests: tiny VarNets with random weights, a phantom scan.

Imported by the test modules (``from inference_helpers import fresh_cache, tiny_spec, ...``:
pytest finds fixtures imported into a module), rather than kept in a ``conftest.py``:
``from conftest import ...`` in ``tests/`` must keep meaning ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

TINY = dict(cascades=2, chans=4, pools=2, sens_chans=0)


def save_tiny_checkpoint(path: Path, seed: int = 0, **config) -> Path:
    """A checkpoint like ``models.train_varnet.save`` writes, of a tiny VarNet with seeded random weights."""
    import torch

    from models.varnet import VarNet

    torch.manual_seed(seed)
    net = VarNet(**(config or TINY))
    torch.save({"config": net.config, "state_dict": net.state_dict(), "meta": {"steps": 0, "seed": seed}}, path)
    return path


def reset_cache(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """Body of each test module's autouse fixture: an empty process-wide model cache and an
    on-disk cache in ``tmp_path`` (yielded) for every test."""
    from inline.inference import clear_cache

    monkeypatch.setenv("INLINE_MODEL_CACHE", str(tmp_path / "model-cache"))
    clear_cache()
    yield tmp_path / "model-cache"
    clear_cache()


def make_tiny_spec(tmp_path: Path):
    """A :class:`ModelSpec` of a tiny random VarNet saved in ``tmp_path``."""
    from inline.inference import ModelSpec

    return ModelSpec.from_file(save_tiny_checkpoint(tmp_path / "tiny.pt"), name="tiny")


def phantom_inputs(batch: int = 1, coils: int = 4, n: int = 32, acceleration: int = 4, acs_lines: int = 8, seed: int = 0):
    """``(kspace, mask, acs_mask)`` NumPy arrays: an ellipse phantom with smooth complex coil
    sensitivities, undersampled along ky (every ``acceleration``-th line plus the centre),
    scaled so the image is O(1). Shapes ``(batch, coils, n, n)`` complex64 and ``(batch, 1, n, 1)`` float32."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    image = ((x / 0.7) ** 2 + (y / 0.9) ** 2 < 1).astype(np.float32) + 0.5 * ((x - 0.2) ** 2 + y ** 2 < 0.1)
    angles = np.linspace(0, 2 * np.pi, coils, endpoint=False)
    maps = np.stack([np.exp(-((x - 1.2 * np.cos(a)) ** 2 + (y - 1.2 * np.sin(a)) ** 2) / 2) * np.exp(1j * a) for a in angles])
    ky = np.arange(n)
    acs = np.abs(ky - n // 2 + 0.5) < acs_lines / 2
    sampled = ((ky - n // 2) % acceleration == 0) | acs
    kspace = np.empty((batch, coils, n, n), np.complex64)
    for b in range(batch):
        coil_images = maps * image * np.exp(1j * rng.uniform(0, 2 * np.pi))
        k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_images, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
        noise = 0.01 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
        kspace[b] = ((k + noise) * sampled[:, None]).astype(np.complex64)
    mask = np.broadcast_to(sampled.astype(np.float32).reshape(1, 1, n, 1), (batch, 1, n, 1)).copy()
    acs_mask = np.broadcast_to(acs.astype(np.float32).reshape(1, 1, n, 1), (batch, 1, n, 1)).copy()
    return kspace, mask, acs_mask


def nrmse(output, reference) -> float:
    """``||output - reference|| / ||reference||``."""
    output, reference = np.asarray(output), np.asarray(reference)
    return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))


def reference_output(spec, kspace, mask, acs_mask) -> np.ndarray:
    """The network's fp32 eager output, straight through PyTorch (no inference engine)."""
    import torch

    from inline.inference import load_network

    net, _ = load_network(spec)
    with torch.inference_mode():
        return net(*(torch.from_numpy(a) for a in (kspace, mask, acs_mask))).numpy()


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    yield from reset_cache(tmp_path, monkeypatch)


@pytest.fixture
def tiny_spec(tmp_path):
    return make_tiny_spec(tmp_path)
