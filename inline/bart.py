"""BART (Berkeley Advanced Reconstruction Toolbox) as a reference: .cfl files and the CLI.

Tests and benchmarks compare our reconstructions with BART's on the same data; this module
is the one place that knows BART's file format (``.hdr`` text dims + ``.cfl`` complex64,
column-major; BART ``src/misc/mmio.c``) and its dimension order (``src/misc/mri.h``:
0 READ (x), 1 PHS1 (y), 2 PHS2 (z), 3 COIL, 4 MAPS, ...).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np


class BartNotFound(RuntimeError):
    """The ``bart`` executable is not on PATH (Debian: ``apt-get install bart``)."""


def bart_executable() -> str:
    exe = shutil.which("bart")
    if exe is None:
        raise BartNotFound("bart not on PATH (apt-get install bart)")
    return exe


def write_cfl(base: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (any shape, BART axis order) as ``base.hdr`` + ``base.cfl``."""
    base = Path(base)
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(d) for d in array.shape) + "\n")
    np.asarray(array, np.complex64).ravel(order="F").tofile(base.with_suffix(".cfl"))


def read_cfl(base: str | Path) -> np.ndarray:
    """Read ``base.hdr`` + ``base.cfl`` into a complex64 array in BART axis order."""
    base = Path(base)
    dims = [int(d) for d in base.with_suffix(".hdr").read_text().splitlines()[1].split()]
    data = np.fromfile(base.with_suffix(".cfl"), np.complex64, int(np.prod(dims)))
    return data.reshape(dims, order="F")


def bart(cwd: str | Path, *args: str, timeout_s: float = 300.0) -> str:
    """Run ``bart ARGS`` in ``cwd``; returns stdout; raises CalledProcessError with stderr."""
    out = subprocess.run([bart_executable(), *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=timeout_s)
    return out.stdout


def kspace_to_bart(kspace: np.ndarray) -> np.ndarray:
    """``(coils, kz, ky, kx)`` -> BART ``(x, y, z, coils)``."""
    return np.transpose(kspace, (3, 2, 1, 0))


def image_from_bart(image: np.ndarray) -> np.ndarray:
    """BART ``(x, y, z, ...)`` -> ``(..., z, y, x)`` with trailing singleton BART dims dropped."""
    image = np.asarray(image)
    while image.ndim > 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return np.transpose(image, tuple(range(image.ndim - 1, -1, -1)))
