"""Image finishing: magnitude, scaling to the stored type, ISMRMRD image header and MRD meta.

Sources: Gadgetron ``gadgets/mri_core/ExtractGadget`` (magnitude), ``AutoScaleGadget``
(99th percentile mapped to 2048), ``FloatToFixPointGadget`` (clamp to 0..4095 for
ushort), ``ImageFinishGadget``; python-ismrmrd-server ``simplefft.py`` (image header from
the acquisition, meta DataRole / ImageProcessingHistory / WindowCenter / WindowWidth).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

import ismrmrd
import numpy as np
from pydantic import Field, model_validator

from inline.backend import to_host
from inline.buffers import ImageBuffer
from inline.gadget import AccumulatingGadget, GadgetParams, Output
from inline.registry import register
from inline.trace import Trace

_STORED: dict[str, tuple[type, int]] = {
    "ushort": (np.uint16, 65535),
    "short": (np.int16, 32767),
    "float": (np.float32, 0),
}


@register
class ImageFinish(AccumulatingGadget):
    """Turn a reconstructed :class:`ImageBuffer` into an ``ismrmrd.Image`` ready to send.

    Data: ``|data|`` of ``(channels, z, y, x)`` (normally ``(1, z, y, x)`` after
    :class:`~gadgets.coil_combine.CoilCombine`), stored as ``data_type``:

    * ``ushort`` / ``short``: multiplied by a scale, rounded, clipped to
      ``0..max_intensity`` (4095 by default: 12-bit, Gadgetron's FloatToUShortGadget; up to
      65535 / 32767). The scale is ``scale`` when given, else computed once per series (this
      gadget instance) from its first image, Gadgetron AutoScale style: the 99th percentile
      of the magnitude maps to ``autoscale_target`` (2048). Later images reuse it, so slices
      and repetitions share one scale.
    * ``float``: float32 magnitude times ``scale`` (1 when not given): no autoscaling.

    Header (from the buffer's reference acquisition header): position, read/phase/slice
    directions, patient_table_position, acquisition and physiology time stamps,
    measurement_uid; slice/contrast/phase/repetition/set from the buffer index;
    ``field_of_view`` = ``field_of_view_mm``; ``matrix_size`` from the data (z = 1 for 2D
    encodings); image_type magnitude; ``image_series_index`` (param); ``image_index``
    1, 2, ... per series in emission order.

    Meta (``image.attribute_string``): DataRole=Image, ImageProcessingHistory = buffer
    history + MAGNITUDE, WindowCenter / WindowWidth = max/2 and max of the stored values
    (simplefft convention), SeriesDescription (param), and the buffer's extra ``meta``
    keys (e.g. ``InlineReconMethod``).

    The gadget accumulates only the series scale and the image counter.

    Raises:
        ValueError: ``data`` is not 4-D, or (at configuration) ``max_intensity`` exceeds
            the stored type's range.
    """

    class Params(GadgetParams):
        data_type: Literal["ushort", "float", "short"] = Field("ushort", description="Stored pixel type.")
        scale: float | None = Field(
            None,
            gt=0,
            description="Fixed intensity scale; None: autoscale once per series (ushort/short) or 1 (float).",
        )
        autoscale_target: float = Field(
            2048.0,
            gt=0,
            description="Stored value the 99th percentile of the first image maps to (ushort/short autoscale).",
        )
        max_intensity: int = Field(
            4095,
            ge=1,
            description="Clip limit for ushort/short (4095: 12-bit Gadgetron convention; up to 65535/32767).",
        )
        image_series_index: int = Field(
            1, ge=0, le=65535, description="ISMRMRD image_series_index of the output images."
        )
        series_description: str = Field("inline", description="SeriesDescription meta value.")

        @model_validator(mode="after")
        def _fits_type(self) -> ImageFinish.Params:
            limit = _STORED[self.data_type][1]
            if limit and self.max_intensity > limit:
                raise ValueError(f"max_intensity {self.max_intensity} exceeds the {self.data_type} range 0..{limit}")
            return self

    accepts: ClassVar[tuple[type, ...]] = (ImageBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ismrmrd.Image,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        #: intensity scale of this series (None until the first image)
        self.series_scale: float | None = self.params.scale
        self._next_index = 1

    def _scale_for(self, mag: np.ndarray) -> float:
        if self.series_scale is None:
            if self.params.data_type == "float":
                self.series_scale = 1.0
            else:
                p99 = float(np.percentile(mag, 99))
                if p99 > 0:
                    self.series_scale = self.params.autoscale_target / p99
                else:
                    self.log.warning(
                        "ImageFinish: first image of series %d is empty; scale 1", self.params.image_series_index
                    )
                    self.series_scale = 1.0
        return self.series_scale

    def _header(self, item: ImageBuffer) -> ismrmrd.ImageHeader:
        h = ismrmrd.ImageHeader()
        a = item.header
        if a is not None:
            for name in (
                "measurement_uid",
                "position",
                "read_dir",
                "phase_dir",
                "slice_dir",
                "patient_table_position",
                "acquisition_time_stamp",
                "physiology_time_stamp",
            ):
                setattr(h, name, getattr(a, name))
        for name in ("slice", "contrast", "phase", "repetition", "set", "average"):
            setattr(h, name, getattr(item.index, name, 0))
        h.version = 1
        h.field_of_view = tuple(float(v) for v in item.field_of_view_mm)
        h.image_type = ismrmrd.IMTYPE_MAGNITUDE
        h.image_series_index = self.params.image_series_index
        h.image_index = self._next_index
        return h

    def process(self, item: ImageBuffer, trace: Trace) -> Iterator[Output]:
        if item.data.ndim != 4:
            raise ValueError(f"ImageFinish: image data must be (channels, z, y, x), got shape {item.data.shape}")
        mag = np.abs(to_host(item.data)).astype(np.float32, copy=False)  # images leave the device here
        scale = self._scale_for(mag)
        dtype, _ = _STORED[self.params.data_type]
        if self.params.data_type == "float":
            stored = mag * np.float32(scale) if scale != 1.0 else mag
        else:
            stored = np.clip(np.rint(mag * np.float32(scale)), 0, self.params.max_intensity).astype(dtype)
        stored = np.ascontiguousarray(stored)
        image = ismrmrd.Image(head=self._header(item), data=stored)
        self._next_index += 1
        top = float(stored.max()) if stored.size else 0.0
        meta = ismrmrd.Meta(item.meta)  # a gadget's extra keys (e.g. InlineReconMethod); the standard ones win
        meta["DataRole"] = "Image"
        meta["ImageProcessingHistory"] = [*item.history, "MAGNITUDE"]
        meta["WindowCenter"] = f"{top / 2:g}"
        meta["WindowWidth"] = f"{top:g}"
        meta["SeriesDescription"] = self.params.series_description
        image.meta = meta
        yield image, trace
