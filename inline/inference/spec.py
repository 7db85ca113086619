"""Model specs: a weights file, the sha256 it must have, and the factory that builds the network.

A checkpoint is what :func:`models.train_varnet.save` writes with :func:`torch.save`: a dict
``{"config": {factory kwargs}, "state_dict": {...}, "meta": {...}}``. The file is read once,
hashed and deserialised from the same bytes, so a checkpoint replaced on disk while it is
being loaded (training rewrites it atomically) cannot pass the check with other contents.
Weights are loaded with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_FACTORY = "models.varnet:VarNet"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelSpecError(ValueError):
    """A model spec or checkpoint is unusable: bad checksum string, missing file, wrong contents."""


class ChecksumMismatch(ModelSpecError):
    """The weights file's sha256 is not the one the spec declares."""

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for model weights {path}: expected {expected}, actual {actual}")
        self.path, self.expected, self.actual = path, expected, actual


def sha256_bytes(data: bytes) -> str:
    """Lower-case hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Lower-case hex sha256 of a file's contents."""
    return sha256_bytes(Path(path).read_bytes())


@dataclass(frozen=True)
class ModelSpec:
    """What to load: ``weights`` (a checkpoint file), the ``sha256`` it must have, and
    ``factory`` (``"module:Class"`` or a callable) called with the checkpoint's ``config``.

    Raises:
        ModelSpecError: ``sha256`` is not 64 hex digits.
    """

    name: str
    weights: Path
    sha256: str
    factory: str | Callable[..., Any] = DEFAULT_FACTORY
    #: factory kwargs for checkpoints without a ``config`` entry (a checkpoint's own config wins)
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", Path(self.weights))
        digest = str(self.sha256).strip().lower()
        if not _SHA256.match(digest):
            raise ModelSpecError(f"model {self.name!r}: sha256 must be 64 hex digits, got {self.sha256!r}")
        object.__setattr__(self, "sha256", digest)

    @classmethod
    def from_file(cls, weights: str | Path, name: str | None = None, factory: str | Callable[..., Any] = DEFAULT_FACTORY) -> ModelSpec:
        """A spec that trusts ``weights`` as it is now (its current sha256): for development
        and tests; shipped models declare their checksum (:mod:`inline.inference.registry`)."""
        weights = Path(weights)
        return cls(name or weights.stem, weights, sha256_file(weights), factory)


def resolve_factory(factory: str | Callable[..., Any]) -> Callable[..., Any]:
    """The callable behind ``"package.module:Name"`` (or ``factory`` itself).

    Raises:
        ModelSpecError: not importable.
    """
    if callable(factory):
        return factory
    module_name, _, attr = str(factory).partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ModelSpecError(f"cannot import model factory {factory!r}: {e}") from e


def load_network(spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    """Read, verify and build ``spec``'s network on the CPU, in eval mode, without gradients.

    Returns:
        ``(module, meta)``: the ``torch.nn.Module`` and the checkpoint's ``meta`` dict (``{}`` if absent).

    Raises:
        ModelSpecError: the file is missing or is not a checkpoint dict with a ``state_dict``.
        ChecksumMismatch: the file's sha256 differs from ``spec.sha256``.
    """
    import torch

    try:
        data = spec.weights.read_bytes()
    except OSError as e:
        raise ModelSpecError(f"model {spec.name!r}: cannot read weights {spec.weights}: {e}") from e
    actual = sha256_bytes(data)
    if actual != spec.sha256:
        raise ChecksumMismatch(spec.weights, spec.sha256, actual)
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of a corrupt or foreign file
        raise ModelSpecError(f"model {spec.name!r}: {spec.weights} is not a torch checkpoint: {e}") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelSpecError(f"model {spec.name!r}: {spec.weights} must hold a dict with 'state_dict' (and 'config', 'meta')")
    config = dict(checkpoint.get("config") or spec.config)
    net = resolve_factory(spec.factory)(**config)
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:  # missing/unexpected keys, shape mismatches
        raise ModelSpecError(f"model {spec.name!r}: weights {spec.weights} do not fit {spec.factory} with {config}: {e}") from e
    net.eval().requires_grad_(False)
    meta = dict(checkpoint.get("meta") or {})
    log.info("loaded model %s from %s (sha256 %s..., config %s)", spec.name, spec.weights, spec.sha256[:12], config)
    return net, meta
