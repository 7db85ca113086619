"""Input shapes of the reconstruction networks and their checks at the engine boundary.

Axis vocabulary (:mod:`models.varnet`): k-space ``(batch, coils, ky, kx)`` complex64; the
sampling and calibration masks ``(batch, 1, ky, 1)`` float32 in {0, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass

Shape = tuple[int, int, int, int]
"""A k-space shape ``(batch, coils, ky, kx)``."""

AXES = ("batch", "coils", "ky", "kx")


def as_shape(shape: object) -> Shape:
    """``shape`` as a 4-tuple of positive ints.

    Raises:
        ValueError: not four positive integers ``(batch, coils, ky, kx)``.
    """
    try:
        dims = tuple(int(d) for d in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError) as e:
        raise ValueError(f"a k-space shape is (batch, coils, ky, kx), got {shape!r}") from e
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"a k-space shape is four positive ints (batch, coils, ky, kx), got {shape!r}")
    return dims  # type: ignore[return-value]


def mask_shape(shape: Shape) -> tuple[int, int, int, int]:
    """The mask shape ``(batch, 1, ky, 1)`` that goes with k-space ``shape``."""
    return (shape[0], 1, shape[2], 1)


@dataclass(frozen=True)
class ShapeRange:
    """A range of k-space shapes an engine is built for (TensorRT optimisation profile):
    every axis of ``min`` <= ``opt`` <= ``max``; ``opt`` is the shape tuned for.

    Raises:
        ValueError: shapes not ordered axis by axis.
    """

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        lo, opt, hi = as_shape(self.min), as_shape(self.opt), as_shape(self.max)
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ValueError(f"shape range needs min <= opt <= max on every axis {AXES}, got {lo}, {opt}, {hi}")
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "opt", opt)
        object.__setattr__(self, "max", hi)

    @classmethod
    def static(cls, shape: Shape) -> ShapeRange:
        """The range holding ``shape`` only."""
        shape = as_shape(shape)
        return cls(shape, shape, shape)

    def contains(self, shape: Shape) -> bool:
        """``shape`` lies inside the range on every axis."""
        return all(a <= s <= b for a, s, b in zip(self.min, shape, self.max))


def check_inputs(kspace_shape: tuple[int, ...], kspace_dtype: str, mask_shapes: dict[str, tuple[int, ...]], mask_dtypes: dict[str, str]) -> Shape:
    """Check the network inputs' shapes and dtypes (as strings such as ``"complex64"``).

    Returns:
        The k-space shape ``(batch, coils, ky, kx)``.

    Raises:
        ValueError: naming the expected shapes and dtypes and what was given.
    """
    if len(kspace_shape) != 4 or kspace_dtype != "complex64":
        raise ValueError(
            f"kspace must be (batch, coils, ky, kx) complex64; got shape {tuple(kspace_shape)} dtype {kspace_dtype}"
        )
    shape: Shape = tuple(int(d) for d in kspace_shape)  # type: ignore[assignment]
    if min(shape) < 1:
        raise ValueError(f"kspace (batch, coils, ky, kx) must not be empty; got shape {shape}")
    expected = mask_shape(shape)
    for name, got in mask_shapes.items():
        if tuple(got) != expected or mask_dtypes[name] != "float32":
            raise ValueError(
                f"{name} must be (batch, 1, ky, 1) = {expected} float32 for kspace {shape}; "
                f"got shape {tuple(got)} dtype {mask_dtypes[name]}"
            )
    return shape
