"""Pooled matrix <-> stored bytes.

A stored value is one zstd frame of the row-major float16 matrix, written with its content size and
a content checksum. Decoding checks, before allocating anything, that the frame declares exactly the
size the shape implies (rows x d x 2 bytes), so a crafted value cannot make us allocate more; the
checksum catches bit flips, the size check truncation. A value must be exactly one frame: a frame
without a checksum, or anything after the frame (appended bytes, a second or skippable frame), is
refused rather than ignored.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

DEFAULT_LEVEL = 3
STORED_DTYPE = "float16"


_EMPTY_FRAME = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(b"")
# One decompressor per thread, reused: making one per matrix was a quarter of decoding a short matrix
# (a served request decodes ~100), and a ZstdDecompressor must not be shared between threads.
_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


class CorruptMatrixError(ValueError):
    """A stored matrix could not be decoded (truncated, bit-flipped, wrong size, not finite)."""


def to_float16(matrix: np.ndarray, what: str = "matrix") -> np.ndarray:
    """Cast to float16, failing loudly if any value is (or becomes) non-finite."""
    with np.errstate(over="ignore"):  # overflow is reported below, naming the input
        out = np.ascontiguousarray(matrix, dtype=np.float16)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise ValueError(
            f"{what}: {bad} value(s) are not finite after the cast to float16 "
            "(float16 holds |x| <= 65504); refusing to store them"
        )
    return out


def encode_matrix(matrix: np.ndarray, level: int = DEFAULT_LEVEL) -> bytes:
    """Compress a ``(rows, d)`` float16 matrix into one checksummed zstd frame."""
    if matrix.dtype != np.float16 or matrix.ndim != 2:
        raise TypeError(f"expected a 2-D float16 matrix, got {matrix.dtype} with shape {matrix.shape}")
    return _compressor(level).compress(np.ascontiguousarray(matrix).tobytes())


_LOCAL = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor at ``level`` (a compressor is not thread-safe). Creating one per matrix
    cost ~50 us, 20x the compression of a small matrix itself; reusing it writes the same bytes."""
    cache: dict[int, zstandard.ZstdCompressor] = _LOCAL.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cache[level]


def decode_matrix(blob: bytes | memoryview | None, rows: int, d: int, what: str = "matrix") -> np.ndarray:
    """Decompress one stored value into a ``(rows, d)`` float16 matrix.

    Raises
    ------
    CorruptMatrixError
        Naming ``what`` (callers pass the row id and column) when the value is missing, declares
        another size, fails its checksum, or holds non-finite values.
    """
    if blob is None:
        raise CorruptMatrixError(f"{what}: no stored matrix (null value)")
    expected = rows * d * 2
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as e:
        raise CorruptMatrixError(f"{what}: not a zstd frame ({e})") from e
    if params.content_size != expected:
        raise CorruptMatrixError(
            f"{what}: frame declares {params.content_size} bytes, the shape ({rows}, {d}) float16 needs {expected}"
        )
    if not params.has_checksum:
        raise CorruptMatrixError(f"{what}: frame has no content checksum (kalm-store always writes one)")
    if expected == 0:  # zstd returns b"" for a frame declaring 0 bytes without reading on: compare whole
        if bytes(blob) != _EMPTY_FRAME:
            raise CorruptMatrixError(f"{what}: an empty ({rows}, {d}) matrix must be the empty frame, got {len(blob)} bytes")
        return np.zeros((rows, d), np.float16)
    try:
        # allow_extra_data=False: bytes after the one frame mean the value was altered; never ignore them
        raw = _decompressor().decompress(blob, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CorruptMatrixError(f"{what}: corrupt zstd frame ({e})") from e
    if len(raw) != expected:
        raise CorruptMatrixError(f"{what}: decoded {len(raw)} bytes, expected {expected}")
    matrix = np.frombuffer(raw, dtype=np.float16).reshape(rows, d)  # (rows, d)
    if not np.isfinite(matrix).all():
        raise CorruptMatrixError(f"{what}: decoded matrix holds non-finite values")
    return matrix
