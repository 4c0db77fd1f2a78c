"""Hints in error messages spelled the way the caller passes options: CLI flags under ``kalm-store``,
keyword arguments in Python (``--mode fts`` there, ``mode='fts'`` here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CLI: ContextVar[bool] = ContextVar("kalm_store_cli_hints", default=False)


@contextmanager
def cli_spelling() -> Iterator[None]:
    """Within this block (a ``kalm-store`` command running), :func:`option` gives the CLI flag."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def option(python: str, cli: str) -> str:
    """``cli`` (e.g. ``"--mode fts"``) while a command runs, else ``python`` (e.g. ``"mode='fts'"``)."""
    return cli if _CLI.get() else python
