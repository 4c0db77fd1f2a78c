"""Keep the routine progress noise of the libraries underneath away from kalm-store's users.

Two sources, both silenced narrowly so that real warnings still reach the user:

* transformers draws a "Loading weights" bar (and "Writing model shards" on save) for every
  checkpoint, also a 1 MB one read from disk in a second; only those bars are turned off, for the
  duration of one load or save, and turned back on afterwards if they were on.
* Lance's scanner logs a deprecation WARN on every search that selects columns without the
  first-stage score (``_distance``/``_score``), which LanceDB's hybrid query cannot ask for. Its
  Rust logger reads ``LANCEDB_LOG`` once, when lancedb is first imported: ``import kalm_store`` sets
  it (unless the user did) to warnings for everything but that one module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LANCEDB_LOG_DEFAULT = "warn,lance::dataset::scanner=error"


def quiet_lancedb_log() -> bool:
    """Set ``LANCEDB_LOG`` to :data:`LANCEDB_LOG_DEFAULT` unless it is set; True if it takes effect
    (lancedb not imported yet, and the user's own setting absent)."""
    if "lancedb" in sys.modules or "LANCEDB_LOG" in os.environ:
        return False
    os.environ["LANCEDB_LOG"] = LANCEDB_LOG_DEFAULT
    return True


@contextmanager
def no_weight_bars() -> Iterator[None]:
    """transformers' progress bars off inside the block (its log messages and warnings untouched)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
