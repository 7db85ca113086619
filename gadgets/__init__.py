"""The stage library: gadgets that chain configs in ``configs/`` refer to by class name.

Importing this package registers every standard gadget with :func:`inline.registry.register`.
"""

from gadgets.accumulate import AcquisitionAccumulateTrigger
from gadgets.coil_combine import CoilCombine
from gadgets.fft_recon import FFTRecon
from gadgets.image_finish import ImageFinish
from gadgets.noise import NoiseAdjust
from gadgets.oversampling import RemoveReadoutOversampling

__all__ = [
    "AcquisitionAccumulateTrigger",
    "CoilCombine",
    "FFTRecon",
    "ImageFinish",
    "NoiseAdjust",
    "RemoveReadoutOversampling",
]
