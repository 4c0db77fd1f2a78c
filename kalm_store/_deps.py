"""Heavy and optional imports, loaded only on the path that needs them, with an install hint."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f'pip install "kalm-store[{extra}]"' if extra else "pip install kalm-store"
        raise ImportError(f"{module} is required for this feature but could not be imported ({e}); "
                          f"install it with: {hint}") from e
