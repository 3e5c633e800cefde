"""Module attributes loaded on first use (PEP 562), so that importing a package stays cheap."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, tuple[str, str | None]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` in ``table`` maps to ``(module, attribute)``, a
    module path (``".x"`` relative to ``package``) and the attribute to take from it (None: the module
    itself). The value is imported on first use and kept in the package's namespace; anything else
    raises ``AttributeError`` as a missing attribute does."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = table[name]
        value = importlib.import_module(module, package)
        value = getattr(value, attribute) if attribute else value
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
