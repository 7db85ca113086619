"""Patient motion: rigid model, estimation by image registration, k-space shot consistency, simulation.

* :mod:`inline.motion.rigid` -- :class:`RigidMotion` (3 translations + 3 rotations about the
  image centre), :func:`register_rigid` (SimpleITK), :func:`resample_rigid` (NumPy/CuPy).
* :mod:`inline.motion.kspace` -- when in the acquisition motion happened: per-shot consistency
  of k-space against a reference repetition (or of navigators), with a change-point search.
* :mod:`inline.motion.sim` -- known rigid motion applied in k-space to simulated scans
  (ground truth for the tests and the benchmark).

The gadgets that use them are in :mod:`gadgets.motion`; overview in ``docs/motion.md``.
"""

from inline.motion.rigid import Registration, RigidMotion, register_rigid, resample_rigid

__all__ = ["Registration", "RigidMotion", "register_rigid", "resample_rigid"]
