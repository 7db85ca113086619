"""The models this project ships: name -> weights (relative to the ``models`` package), sha256, factory.

A model's checksum may live in a JSON sidecar next to the ``models`` package,
``models/<name>.json`` = ``{"weights": "weights/<file>.pt", "sha256": "<64 hex>"}``, written
when the weights are published; the sidecar wins over the values declared here. A model with
no checksum in either place cannot be loaded: unverified weights never reach a patient image.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from inline.inference.spec import DEFAULT_FACTORY, ModelSpec, ModelSpecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedModel:
    """One shipped model. ``weights`` is relative to the ``models`` package directory;
    ``sha256`` is ``None`` until the weights are published (then the sidecar carries it)."""

    weights: str
    sha256: str | None
    factory: str = DEFAULT_FACTORY
    description: str = ""


SHIPPED_MODELS: dict[str, ShippedModel] = {
    "varnet_mni152": ShippedModel(
        weights="weights/varnet_mni152.pt",
        sha256=None,  # published in models/varnet_mni152.json
        description="E2E-VarNet (cascades 8, chans 8, pools 3, plain ACS maps) trained on MNI152-simulated 8-coil k-space",
    ),
}


def models_dir() -> Path:
    """The directory of the ``models`` package (found without importing torch)."""
    found = importlib.util.find_spec("models.varnet")
    if found is None or found.origin is None:
        raise ModelSpecError("the 'models' package is not importable (run from the repository or install it)")
    return Path(found.origin).parent


def shipped_spec(name: str, directory: str | Path | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of shipped model ``name``; ``directory`` overrides :func:`models_dir`.

    Raises:
        ModelSpecError: unknown name, unreadable sidecar, or no sha256 declared anywhere.
    """
    if name not in SHIPPED_MODELS:
        raise ModelSpecError(f"unknown model {name!r} (shipped: {', '.join(sorted(SHIPPED_MODELS))})")
    entry = SHIPPED_MODELS[name]
    base = Path(directory) if directory is not None else models_dir()
    weights, sha256 = entry.weights, entry.sha256
    sidecar = base / f"{name}.json"
    if sidecar.is_file():
        try:
            published = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelSpecError(f"model {name!r}: cannot read {sidecar}: {e}") from e
        weights = published.get("weights", weights)
        sha256 = published.get("sha256", sha256)
    if not sha256:
        raise ModelSpecError(
            f"model {name!r} has no sha256: write {sidecar} as "
            f'{{"weights": "{weights}", "sha256": "<sha256sum of the weights>"}}'
        )
    return ModelSpec(name, base / weights, sha256, entry.factory)
