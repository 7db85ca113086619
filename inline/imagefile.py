"""Reconstructed images on disk: ISMRMRD .h5 image groups and PNG previews.

Images go to ``/dataset/image_<image_series_index>`` via ``ismrmrd.Dataset.append_image``,
the layout ``ismrmrd.Dataset.read_image`` and gadgetron_ismrmrd_client use.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import ismrmrd
import numpy as np

log = logging.getLogger(__name__)


def image_group(image: ismrmrd.Image) -> str:
    """Group name of an image inside the dataset: one group per series."""
    return f"image_{image.image_series_index}"


class ImageFileWriter:
    """Collects images into an ISMRMRD .h5 file (created or truncated)."""

    def __init__(self, path: str | Path, dataset: str = "dataset"):
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self._ds = ismrmrd.Dataset(str(self.path), dataset, create_if_needed=True)
        self.count = 0

    def append(self, image: ismrmrd.Image) -> None:
        self._ds.append_image(image_group(image), image)
        self.count += 1

    def close(self) -> Path:
        self._ds.close()
        return self.path


def write_images(images: list[ismrmrd.Image], path: str | Path | None = None, previews: str | Path | None = None) -> None:
    """Write ``images`` to an ISMRMRD .h5 (when ``path``) and PNG previews (when ``previews``)."""
    if path is not None:
        writer = ImageFileWriter(path)
        for im in images:
            writer.append(im)
        writer.close()
    if previews is not None and images:
        write_previews(images, previews)


def read_images(path: str | Path, dataset: str = "dataset") -> dict[str, list[ismrmrd.Image]]:
    """All images of an ISMRMRD .h5 file, by group name (``image_<series>``)."""
    out: dict[str, list[ismrmrd.Image]] = {}
    ds = ismrmrd.Dataset(str(path), dataset, create_if_needed=False)
    try:
        for name in ds.list():
            if name.startswith("image_"):
                out[name] = [ds.read_image(name, i) for i in range(ds.number_of_images(name))]
    finally:
        ds.close()
    return out


def write_previews(images: list[ismrmrd.Image], out_dir: str | Path, prefix: str = "preview") -> list[Path]:
    """One PNG mosaic per image series (slices in order), grey scale, window from the images' meta.

    Returns the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_series: dict[int, list[ismrmrd.Image]] = defaultdict(list)
    for im in images:
        by_series[im.image_series_index].append(im)
    written = []
    for series, ims in sorted(by_series.items()):
        ims.sort(key=lambda im: (im.repetition, im.contrast, im.slice, im.image_index))
        planes = [np.abs(np.asarray(im.data, dtype=np.float64))[0, im.data.shape[1] // 2] for im in ims]
        n = len(planes)
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        vmax = float(np.percentile(np.concatenate([p.ravel() for p in planes]), 99.5)) or 1.0
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, im, p in zip(axes.ravel(), ims, planes):
            ax.imshow(p, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"sl {im.slice} rep {im.repetition}", fontsize=7)
        fig.suptitle(f"series {series}: {n} images", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{prefix}_series{series}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
