"""Lazy package exports: a package's public names are imported on first use, so importing the package (and
``vitq --help``) does not wait for torch."""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, table: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``name`` from the module ``table[name]`` (relative
    to the package) on first use and keeps it in the package's namespace."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
