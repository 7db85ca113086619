"""Name -> gadget class lookup for chain configs.

Gadgets of the standard library (:mod:`gadgets`) register with :func:`register`; a config
may also name any importable class as ``"package.module:ClassName"`` so physicists can
chain their own gadgets without touching this project.
"""

from __future__ import annotations

import importlib

from inline.gadget import Gadget

_REGISTRY: dict[str, type[Gadget]] = {}


class UnknownGadget(LookupError):
    """A config names a gadget class that is neither registered nor importable."""


def register(cls: type[Gadget]) -> type[Gadget]:
    """Class decorator: make ``cls`` available to configs under its class name."""
    if not (isinstance(cls, type) and issubclass(cls, Gadget)):
        raise TypeError(f"{cls!r} is not a Gadget subclass")
    _REGISTRY[cls.__name__] = cls
    return cls


def _load_standard_library() -> None:
    importlib.import_module("gadgets")


def lookup(name: str) -> type[Gadget]:
    """Gadget class for a config's ``class`` entry; raises :class:`UnknownGadget`."""
    _load_standard_library()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise UnknownGadget(f"cannot import gadget {name!r}: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Gadget)):
            raise UnknownGadget(f"{name!r} is not a Gadget subclass")
        return cls
    known = ", ".join(sorted(_REGISTRY))
    raise UnknownGadget(f"unknown gadget {name!r} (known: {known}; or give 'module:Class')")


def all_gadgets() -> dict[str, type[Gadget]]:
    """Every registered gadget, by name."""
    _load_standard_library()
    return dict(sorted(_REGISTRY.items()))
