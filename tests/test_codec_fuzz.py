"""Property-based fuzz of the stored-matrix codec (kalm_store/codec.py).

Contract under test: for any bytes, ``decode_matrix(blob, rows, d)`` either returns exactly the
matrix that was encoded (bitwise) or raises :class:`CorruptMatrixError`: never another exception,
never a different matrix, never an allocation beyond ``rows * d * 2`` bytes.

Example counts come from a hypothesis settings profile: ``HYPOTHESIS_PROFILE=ci`` (default, 300 per
property) or ``HYPOTHESIS_PROFILE=bench`` (10,000 per property; run by
``benchmarks/bench_reliability.py``). ``CASES`` counts the examples each property actually ran.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalm_store.codec import CorruptMatrixError, decode_matrix, encode_matrix, to_float16

settings.register_profile("ci", max_examples=300, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("bench", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE if PROFILE in ("ci", "bench") else "ci"))

CASES: Counter[str] = Counter()  # property -> examples run (read by the benchmark)
OUTCOMES: Counter[str] = Counter()  # "refused" / "same matrix" per mutation kind

SKIPPABLE_MAGIC = 0x184D2A50


def make_matrix(seed: int, rows: int, d: int, pattern: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if pattern == "zeros":  # compresses to almost nothing: the case a bomb would imitate
        return np.zeros((rows, d), np.float16)
    if pattern == "repeat":
        return np.tile(rng.standard_normal((1, d)), (rows, 1)).astype(np.float16)
    return to_float16(rng.standard_normal((rows, d)) * 10.0 ** rng.integers(-3, 4))


matrices = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 24), st.integers(1, 48),
                     st.sampled_from(["normal", "zeros", "repeat"]))


def skippable_frame(payload: bytes) -> bytes:
    return struct.pack("<II", SKIPPABLE_MAGIC, len(payload)) + payload


def mutate(blob: bytes, kind: str, data: st.DataObject) -> bytes:
    """Apply one kind of damage to a stored value."""
    n = len(blob)
    if kind == "bitflip":
        flips = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=4))
        out = bytearray(blob)
        for pos, bit in flips:
            out[pos] ^= 1 << bit
        return bytes(out)
    if kind == "truncate":
        return blob[:data.draw(st.integers(0, n - 1))]
    if kind == "append":
        return blob + data.draw(st.binary(min_size=1, max_size=64))
    if kind == "second_frame":
        return blob + zstandard.ZstdCompressor(write_checksum=True).compress(data.draw(st.binary(max_size=64)))
    if kind == "same_frame_twice":
        return blob + blob
    if kind == "skippable_after":
        return blob + skippable_frame(data.draw(st.binary(max_size=32)))
    if kind == "skippable_before":
        return skippable_frame(data.draw(st.binary(max_size=32))) + blob
    if kind == "overwrite":
        pos = data.draw(st.integers(0, n - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        return blob[:pos] + chunk + blob[pos + len(chunk):]
    if kind == "random":
        return data.draw(st.binary(max_size=256))
    raise AssertionError(kind)


KINDS = ["bitflip", "truncate", "append", "second_frame", "same_frame_twice", "skippable_after",
         "skippable_before", "overwrite", "random"]
# Damage that always changes what the bytes mean: it must be refused, never decoded.
MUST_REFUSE = {"truncate", "append", "second_frame", "same_frame_twice", "skippable_after", "skippable_before"}


@FUZZ
@given(matrices)
def test_round_trip_is_bitwise(spec):
    CASES["round_trip"] += 1
    m = make_matrix(*spec)
    got = decode_matrix(encode_matrix(m), m.shape[0], m.shape[1])
    assert got.dtype == np.float16 and got.shape == m.shape
    assert got.tobytes() == m.tobytes()


@FUZZ
@given(matrices, st.sampled_from(KINDS), st.data())
def test_damaged_bytes_are_refused_or_decode_to_the_original(spec, kind, data):
    CASES["damaged"] += 1
    m = make_matrix(*spec)
    blob = encode_matrix(m)
    bad = mutate(blob, kind, data)
    try:
        got = decode_matrix(bad, m.shape[0], m.shape[1], what="passage id 'p7', column kalm_r4")
    except CorruptMatrixError as e:
        assert "passage id 'p7', column kalm_r4" in str(e)
        OUTCOMES[f"{kind}: refused"] += 1
        return
    # Decoded: only acceptable if it is the very matrix encoded (e.g. a flip in an unused header bit
    # that zstd ignores; the content checksum vouches for the content)
    assert got.tobytes() == m.tobytes(), f"{kind}: silent wrong matrix"
    assert kind not in MUST_REFUSE or bad == blob, f"{kind}: altered bytes accepted"
    OUTCOMES[f"{kind}: {'unchanged' if bad == blob else 'same matrix'}"] += 1


@FUZZ
@given(matrices, st.integers(-3, 3), st.integers(-3, 3))
def test_wrong_shape_is_refused(spec, drow, dd):
    CASES["wrong_shape"] += 1
    m = make_matrix(*spec)
    rows, d = m.shape[0] + drow, m.shape[1] + dd
    if rows * d == m.size:  # another shape with the same byte count cannot be told from the bytes
        return
    with pytest.raises(CorruptMatrixError, match="frame declares"):
        decode_matrix(encode_matrix(m), rows, d)


def _frames(rows: int, d: int):
    """Random bytes, and well-formed frames of random float16 bits (some non-finite, some of another size),
    so that the success branch below runs too."""
    raw = st.binary(min_size=rows * d * 2, max_size=rows * d * 2)
    other = st.binary(max_size=64)
    level = st.sampled_from([1, 3, 19])
    framed = st.tuples(st.one_of(raw, other), level, st.booleans()).map(
        lambda t: zstandard.ZstdCompressor(level=t[1], write_checksum=t[2]).compress(t[0]))
    return st.one_of(st.binary(max_size=512), framed)


@FUZZ
@given(st.integers(0, 16), st.integers(1, 16), st.data())
def test_arbitrary_bytes_never_crash(rows, d, data):
    CASES["arbitrary"] += 1
    blob = data.draw(_frames(rows, d))
    try:
        out = decode_matrix(blob, rows, d)
    except CorruptMatrixError:
        OUTCOMES["arbitrary: refused"] += 1
        return
    OUTCOMES["arbitrary: decoded"] += 1
    # the only way to pass is a well-formed checksummed frame of exactly rows*d*2 finite float16 bytes,
    # and then the matrix is exactly those bytes (checked here with zstd's own frame reader)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16 and out.shape == (rows, d)
    assert np.isfinite(out).all()
    params = zstandard.get_frame_parameters(blob)
    assert params.content_size == rows * d * 2 and params.has_checksum
    if rows * d:
        reader = zstandard.ZstdDecompressor().decompressobj()
        assert reader.decompress(blob) == out.tobytes() and reader.eof and not reader.unused_data


# ---------------------------------------------------------------------- bounded allocation
def _frame_with_content_size(payload_size: int, declared: int) -> bytes:
    """A checksummed frame of ``payload_size`` zero bytes whose header claims ``declared`` bytes."""
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
                     .compress(bytes(payload_size)))
    fhd = blob[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    assert width in (4, 8), width
    blob[pos:pos + width] = declared.to_bytes(width, "little")
    return bytes(blob)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("case", ["declares_4GiB", "declares_shape_but_holds_64MiB", "no_content_size_64MiB",
                                  "second_frame_64MiB"])
def test_crafted_bombs_are_refused_without_allocating(case):
    rows, d = 4, 8  # 64 bytes implied
    big = 64 << 20
    if case == "declares_4GiB":
        # a header claiming 4 GiB: refused from the header alone
        blob = _frame_with_content_size(70_000, (1 << 32) - 1)
        match = "declares 4294967295 bytes"
    elif case == "declares_shape_but_holds_64MiB":
        blob = _frame_with_content_size(big, rows * d * 2)  # header lies: says 64 bytes, blocks hold 64 MiB
        match = "corrupt zstd frame"
    elif case == "no_content_size_64MiB":
        blob = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True).compress(bytes(big))
        match = "frame declares"
    else:
        ok = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(rows * d * 2))
        blob = ok + zstandard.ZstdCompressor(write_checksum=True).compress(bytes(big))
        match = "corrupt zstd frame"
    assert len(blob) < 64 << 10  # a small stored value...

    def go():
        with pytest.raises(CorruptMatrixError, match=match):
            decode_matrix(bytes(blob), rows, d)

    assert _peak_bytes(go) < 1 << 20  # ...never makes us allocate more than 1 MiB


def test_decoding_allocates_only_what_the_shape_implies():
    m = np.ones((512, 256), np.float16)  # 256 KiB raw, compresses to a few hundred bytes
    blob = encode_matrix(m)
    peak = _peak_bytes(lambda: decode_matrix(blob, 512, 256))
    assert peak < 2 * m.nbytes + (64 << 10)


@pytest.mark.parametrize("blob, match", [(None, "null value"), (b"", "not a zstd frame"),
                                         (b"\x28\xb5\x2f", "not a zstd frame")])
def test_degenerate_values(blob, match):
    with pytest.raises(CorruptMatrixError, match=match):
        decode_matrix(blob, 1, 4)


def test_frame_without_checksum_is_refused():
    m = np.ones((3, 4), np.float16)
    blob = zstandard.ZstdCompressor(write_checksum=False, write_content_size=True).compress(m.tobytes())
    with pytest.raises(CorruptMatrixError, match="no content checksum"):
        decode_matrix(blob, 3, 4)


def test_non_finite_content_is_refused():
    m = np.array([[1.0, np.inf], [np.nan, 0.0]], np.float16)
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(m.tobytes())
    with pytest.raises(CorruptMatrixError, match="non-finite"):
        decode_matrix(blob, 2, 2)
