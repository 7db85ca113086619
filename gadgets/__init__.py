"""The stage library: gadgets that chain configs in ``configs/`` refer to by class name.

Importing this package imports every module in it, and each module registers its gadgets
with :func:`inline.registry.register`; a new gadget module needs no edit here.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
