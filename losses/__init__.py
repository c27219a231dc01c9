"""The losses. Importing the package imports every module in it, so that each pairwise loss has registered itself
(losses/registry.py) before the loss ingredient makes a config: a new loss is one new file here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
