"""E2E-VarNet: an unrolled, physics-guided network for multi-coil Cartesian 2D MRI.

Sriram A, Zbontar J, Murrell T, et al. End-to-End Variational Networks for Accelerated MRI
Reconstruction. MICCAI 2020 (arXiv:2004.06688); the structure follows the paper and the
fastMRI reference model's signature (masked k-space, sampling mask, calibration region):

* coil sensitivities are estimated from the fully sampled centre (ACS) of the undersampled
  k-space: low-resolution coil images, refined by a small U-Net, normalised to unit
  root-sum-of-squares;
* ``cascades`` unrolled steps each apply a soft data consistency in k-space and a learned
  refinement of the coil-combined image by a normalised U-Net (Ronneberger et al., MICCAI
  2015), expanded back to coils with the sensitivities;
* the output is the completed multi-coil k-space; its coil images combine by
  root-sum-of-squares like a fully sampled scan's.

Axis order everywhere: ``(batch, coils, ky, kx)`` complex64 for k-space and coil images,
``(batch, ky, kx)`` for combined images, masks ``(batch, 1, ky, 1)`` float32 in {0, 1}.
Complex data stay complex64 tensors; only the U-Nets see a real 2-channel view.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["VarNet", "UNet", "NormUNet", "SensitivityModel", "fft2c", "ifft2c", "rss"]

_DIMS = (-2, -1)


def fft2c(image: Tensor) -> Tensor:
    """Centred orthonormal 2D FFT over the last two axes (image -> k-space), complex in and out."""
    k = torch.fft.ifftshift(image, dim=_DIMS)
    k = torch.fft.fft2(k, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(k, dim=_DIMS)


def ifft2c(kspace: Tensor) -> Tensor:
    """Centred orthonormal 2D inverse FFT over the last two axes (k-space -> image)."""
    x = torch.fft.ifftshift(kspace, dim=_DIMS)
    x = torch.fft.ifft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)


def rss(coil_images: Tensor, dim: int = 1) -> Tensor:
    """Root-sum-of-squares over the coil axis: ``(batch, coils, y, x)`` -> ``(batch, y, x)`` float."""
    return torch.sqrt((coil_images.real ** 2 + coil_images.imag ** 2).sum(dim=dim))


class _ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each with instance normalisation and leaky ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.InstanceNorm2d(cout),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm2d(cout),
            nn.LeakyReLU(0.2, inplace=True),
        )


class UNet(nn.Module):
    """U-Net on real images ``(batch, in_chans, y, x)``; y and x divisible by ``2**pools``."""

    def __init__(self, in_chans: int, out_chans: int, chans: int, pools: int) -> None:
        super().__init__()
        self.down = nn.ModuleList([_ConvBlock(in_chans, chans)])
        ch = chans
        for _ in range(pools - 1):
            self.down.append(_ConvBlock(ch, ch * 2))
            ch *= 2
        self.bottom = _ConvBlock(ch, ch * 2)
        self.up_transpose = nn.ModuleList()
        self.up = nn.ModuleList()
        for _ in range(pools):
            self.up_transpose.append(nn.ConvTranspose2d(ch * 2, ch, 2, stride=2, bias=False))
            self.up.append(_ConvBlock(ch * 2, ch))
            ch //= 2
        self.out = nn.Conv2d(chans, out_chans, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.avg_pool2d(x, 2)
        x = self.bottom(x)
        for transpose, block in zip(self.up_transpose, self.up):
            x = transpose(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.out(x)


class NormUNet(nn.Module):
    """A U-Net on complex images ``(n, y, x)`` complex64 -> ``(n, 1, y, x)`` complex64: split
    into real/imaginary channels, normalised per image (mean and standard deviation per
    channel), padded to a multiple of ``2**pools``, and undone in reverse on the way out.

    Complex tensors are only built at the end, in their final shape: the ONNX exporter has
    no complex ``unsqueeze``/``reshape``."""

    def __init__(self, chans: int, pools: int) -> None:
        super().__init__()
        self.unet = UNet(2, 2, chans, pools)
        self.multiple = 2 ** pools

    def forward(self, image: Tensor) -> Tensor:
        x = torch.stack([image.real, image.imag], dim=1)  # (batch, 2, y, x)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True) + 1e-6
        x = (x - mean) / std
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = self.unet(x)
        x = x[..., ph // 2: ph // 2 + h, pw // 2: pw // 2 + w]
        x = x * std + mean
        return torch.complex(x[:, 0:1], x[:, 1:2])


class SensitivityModel(nn.Module):
    """Coil sensitivities ``(batch, coils, y, x)`` complex64, unit RSS, from the ACS region:
    low-resolution coil images from the calibration lines, refined coil by coil by a
    normalised U-Net, divided by their root-sum-of-squares (E2E-VarNet, section 3.2)."""

    def __init__(self, chans: int, pools: int) -> None:
        super().__init__()
        self.norm_unet = NormUNet(chans, pools) if chans > 0 else None

    def forward(self, kspace: Tensor, acs_mask: Tensor) -> Tensor:
        images = ifft2c(kspace * acs_mask)
        batch, coils, h, w = images.shape
        if self.norm_unet is not None:
            flat = torch.complex(images.real.reshape(batch * coils, h, w), images.imag.reshape(batch * coils, h, w))
            refined = self.norm_unet(flat)
            images = torch.complex(refined.real.reshape(batch, coils, h, w), refined.imag.reshape(batch, coils, h, w))
        return images / (rss(images).unsqueeze(1) + 1e-12)


class _Cascade(nn.Module):
    """One unrolled step: ``k - w M (k - y) - F S R(S^H F^-1 k)``, R a normalised U-Net."""

    def __init__(self, chans: int, pools: int) -> None:
        super().__init__()
        self.refine = NormUNet(chans, pools)
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(self, k: Tensor, measured: Tensor, mask: Tensor, maps: Tensor) -> Tensor:
        combined = (maps.conj() * ifft2c(k)).sum(dim=1)
        refined = fft2c(maps * self.refine(combined))
        return k - self.dc_weight * mask * (k - measured) - refined


class VarNet(nn.Module):
    """E2E-VarNet for multi-coil Cartesian 2D k-space undersampled along ky.

    Args:
        cascades: unrolled steps.
        chans: channels of the first level of each cascade's U-Net.
        pools: down-sampling levels of the U-Nets.
        sens_chans: channels of the sensitivity U-Net (0: plain ACS maps, no network).
        sens_pools: its down-sampling levels.

    Forward:
        kspace: ``(batch, coils, ky, kx)`` complex64, zeros at unsampled lines; scaled so
            that images are O(1) (the gadget scales by the ACS image's 99th percentile).
        mask: ``(batch, 1, ky, 1)`` float32, 1 where a line was sampled.
        acs_mask: ``(batch, 1, ky, 1)`` float32, 1 on the fully sampled calibration lines.

    Returns:
        ``(batch, coils, ky, kx)`` complex64: the completed k-space, same scale as the input.
    """

    def __init__(self, cascades: int = 8, chans: int = 12, pools: int = 3, sens_chans: int = 4, sens_pools: int = 3) -> None:
        super().__init__()
        self.config = dict(cascades=cascades, chans=chans, pools=pools, sens_chans=sens_chans, sens_pools=sens_pools)
        self.sens = SensitivityModel(sens_chans, sens_pools)
        self.cascades = nn.ModuleList([_Cascade(chans, pools) for _ in range(cascades)])

    def forward(self, kspace: Tensor, mask: Tensor, acs_mask: Tensor) -> Tensor:
        maps = self.sens(kspace, acs_mask)
        k = kspace
        for cascade in self.cascades:
            k = cascade(k, kspace, mask, maps)
        return k

    def image(self, kspace: Tensor, mask: Tensor, acs_mask: Tensor) -> Tensor:
        """The RSS image ``(batch, y, x)`` float32 of :meth:`forward`'s k-space."""
        return rss(ifft2c(self(kspace, mask, acs_mask)))


class RealViewVarNet(nn.Module):
    """:class:`VarNet` with real inputs and outputs for exporters without complex tensors
    (ONNX, TensorRT): k-space as ``(batch, coils, ky, kx, 2)`` float32 (real, imaginary)."""

    def __init__(self, net: VarNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, kspace: Tensor, mask: Tensor, acs_mask: Tensor) -> Tensor:
        k = self.net(torch.view_as_complex(kspace), mask, acs_mask)
        return torch.view_as_real(k)
