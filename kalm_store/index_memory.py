"""Memory of the index step: a bounded pool for Lance's BTREE builds (``id``, ``text_digest``), and
the freed heap handed back to the system before it.

Lance trains a BTREE index by sorting the whole column with DataFusion, and merges an update the same
way; the sort spills to disk once its memory pool is full. That pool is ``LANCE_MEM_POOL_SIZE`` bytes
when the variable is set, else 150 MiB (pylance 14). Measured on a 2-core box
(``benchmarks/results/index_memory_pool_only.md``, ``python benchmarks/bench_index_memory.py``: the index created
alone on an existing table), the default lets the ``text_digest`` index add +95 MiB at 1M rows, +341 MiB
at 10M (the sort filling its pool) and +411 MiB at 30M; with a 32 MiB pool +69, +141 and +240 MiB, in
the same time (a smaller pool only spills earlier). What remained grew by a few bytes per row in
Lance's merge phase, whatever the pool (2 to 64 MiB measured), and an incremental update
(``optimize_indices``) holds about 13 B per row already indexed, so building the index in parts as
the table grows would not bound it either.

:func:`bounded_index_memory` sets the variable to :data:`INDEX_POOL_BYTES` around kalm-store's own
index builds (``PassageStore.update_indices``, ``kalm-store optimize``, the server's digest index), so
the build's last step does not take the pool's default. A value the user exported is kept: it is the
way to give Lance more memory (fewer spill files) or less. Lance reads the variable each time it builds
a query plan, so the setting applies to the index calls inside the block and nothing else (the
merge-inserts of a build, whose hash join cannot spill, keep Lance's default pool).

The few bytes per row that remained were glibc's heap, not a Lance structure: the BTREE build's
merge phase allocates and frees many blocks of 32 KiB and more (4096-row pages of 8-byte values and
row ids, spill-file batches), and glibc's *dynamic* mmap threshold, raised by the first such block
freed, puts all later ones in the heap, where they fragment it (anon RSS rose steadily through the
merge). Inside the block the threshold is fixed at :data:`INDEX_MMAP_THRESHOLD_BYTES` (``mallopt``),
so those blocks are mapped and unmapped on their own: the ``text_digest`` index adds +57/+69/+90 MiB
of peak at 1M/10M/30M rows, the ``id`` index +51/+77/+78 (``benchmarks/results/index_memory.md``),
instead of +69/+141/+240 and +90/+184/+232 with the pool alone, for more seconds in the index step
(about 25% on a quiet box; mmap and page faults per block). glibc cannot be put back to a
dynamic threshold, so on leaving the block it is fixed at glibc's starting value, 128 KiB. An
exported ``MALLOC_MMAP_THRESHOLD_`` (which glibc reads at start-up) is the user's choice and kept.

:func:`release_unused_memory` runs before a build's index step: the chunks the build committed were
freed, but the allocators (Arrow's pool, glibc's heap) keep freed pages resident, and the index step's
memory comes on top of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "LANCE_MEM_POOL_SIZE"
# 32 MiB: as low a peak as any pool measured (2 to 64 MiB) at 10M and 30M rows, at no cost in time; a
# billion rows then spill in about 1000 sorted runs for DataFusion to merge (the most runs tried: 30M
# rows in a 2 MiB pool, about 500, built correctly); tests/test_index_memory.py checks lookups after spilling
INDEX_POOL_BYTES = 32 * 2**20
# 32 KiB: one 4096-row page of 8-byte values or row ids, the blocks that fragmented the heap; 64 KiB
# left +108 MiB at 30M rows, 128 KiB +112, 1 MiB +211 (none +204..231)
INDEX_MMAP_THRESHOLD_BYTES = 32 * 2**10
GLIBC_MMAP_THRESHOLD_BYTES = 128 * 2**10  # glibc's starting threshold (M_MMAP_THRESHOLD's default)
MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc malloc.h

_lock = threading.Lock()
_depth = 0  # nested blocks (threads of one process share the environment): set at the first, restore at the last
_saved: str | None = None  # the value before the outermost block, None when the variable was unset
_ours = False  # whether the outermost block set the variable (False: the user's value is kept)
_mmap_set = False  # whether the outermost block fixed glibc's mmap threshold


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` (``mallopt(M_MMAP_THRESHOLD)``): blocks of at least
    that size are mapped and unmapped on their own instead of coming from the heap. Process-wide, and
    it ends glibc's dynamic adjustment for the process. Returns False where the C library has no
    ``mallopt`` (macOS, musl) or refuses the value.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, nbytes) == 1


@contextmanager
def bounded_index_memory(pool_bytes: int = INDEX_POOL_BYTES) -> Iterator[int]:
    """Within the block, Lance's DataFusion memory pool is ``pool_bytes`` unless ``LANCE_MEM_POOL_SIZE``
    was already set (the user's value wins); yields the pool size in effect, in bytes. A value set
    that is not a number of bytes raises ``ValueError`` (Lance would ignore it). glibc's mmap
    threshold is fixed at :data:`INDEX_MMAP_THRESHOLD_BYTES` within the block and at 128 KiB after it,
    unless ``MALLOC_MMAP_THRESHOLD_`` is exported.

    Parameters
    ----------
    pool_bytes : int, default :data:`INDEX_POOL_BYTES` (32 MiB)
        Bytes of sort memory before Lance's index build spills to disk.

    Examples
    --------
    >>> import os
    >>> from kalm_store.index_memory import bounded_index_memory
    >>> os.environ.pop("LANCE_MEM_POOL_SIZE", None) and None
    >>> with bounded_index_memory(1 << 25) as pool:
    ...     os.environ["LANCE_MEM_POOL_SIZE"], pool
    ('33554432', 33554432)
    >>> "LANCE_MEM_POOL_SIZE" in os.environ
    False
    """
    global _depth, _saved, _ours, _mmap_set
    if isinstance(pool_bytes, bool) or not isinstance(pool_bytes, int) or pool_bytes < 1:
        raise ValueError(f"pool_bytes must be a positive int, got {pool_bytes!r}")
    with _lock:
        if _depth == 0:
            _saved = os.environ.get(ENV)
            if _saved is not None and not _saved.strip().isdigit():
                # Lance would log a warning and fall back to its default: say so instead
                raise ValueError(f"{ENV}={_saved!r} is not a number of bytes; unset it, or set it to e.g. "
                                 f"{INDEX_POOL_BYTES} ({INDEX_POOL_BYTES >> 20} MiB)")
            _ours = _saved is None
            if _ours:
                os.environ[ENV] = str(pool_bytes)
            # the merge phase's 32 KiB+ blocks otherwise fragment the heap (module docstring)
            _mmap_set = MALLOC_ENV not in os.environ and set_mmap_threshold(INDEX_MMAP_THRESHOLD_BYTES)
        _depth += 1
        in_effect = int(os.environ[ENV])
    try:
        yield in_effect
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _ours:
                os.environ.pop(ENV, None)
            if _depth == 0 and _mmap_set:
                set_mmap_threshold(GLIBC_MMAP_THRESHOLD_BYTES)  # dynamic mode cannot be restored
                _mmap_set = False


def release_unused_memory() -> bool:
    """Hand freed memory back to the system: Arrow's memory pool, then glibc's heap (``malloc_trim``).

    Returns whether ``malloc_trim`` ran (False where the C library has none, e.g. macOS or musl).
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


__all__ = ["ENV", "GLIBC_MMAP_THRESHOLD_BYTES", "INDEX_MMAP_THRESHOLD_BYTES", "INDEX_POOL_BYTES", "MALLOC_ENV",
           "bounded_index_memory", "release_unused_memory", "set_mmap_threshold"]
