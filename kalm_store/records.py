"""Input records for the bulk builder: streaming readers and one validation function.

Readers yield ``(where, raw)`` pairs, ``where`` naming the input and the line or row
(``corpus.jsonl:17``, ``docs.parquet row 3``), ``raw`` a plain dict; nothing is read ahead beyond one
Arrow batch, so inputs larger than memory stream through. :func:`validate_record` turns a raw dict
into a :class:`Record` or raises :class:`BadRecordError` naming ``where`` and the problem; callers
decide whether to stop (the default) or skip and count.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

InputFormat = Literal["auto", "jsonl", "parquet", "csv"]
FORMATS: tuple[str, ...] = ("auto", "jsonl", "parquet", "csv")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
             ".csv": "csv"}
STDIN = "-"


class BadRecordError(ValueError):
    """One input record is unusable; ``where`` names the input and line/row, ``reason`` the problem."""

    def __init__(self, where: str, reason: str, record_id: str | None = None) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.record_id = record_id  # the record's id when it has a usable one (for --skip-bad reports)


@dataclass(frozen=True)
class Record:
    """A validated input record."""

    id: str
    text: str
    vector: list[float] | None = None  # retrieval embedding when brought by the input
    where: str = ""  # input and line/row it came from, for messages
    extra: dict[str, Any] = field(default_factory=dict)  # other input fields kept as columns (Fields.keep)


@dataclass(frozen=True)
class Fields:
    """Which input fields hold what."""

    id: str = "id"
    text: str = "text"
    vector: str | None = None  # None: vectors are computed (embedder) or absent (text-only store)
    keep: tuple[str, ...] | None = None  # other fields kept as columns: None every one, () none

    def kept(self, name: str) -> bool:
        """Is ``name`` an other field this build keeps as a column?"""
        return name not in (self.id, self.text, self.vector) and (self.keep is None or name in self.keep)


def resolve_format(path: str, fmt: InputFormat = "auto") -> str:
    """The concrete format of ``path``: ``fmt`` unless ``"auto"``, else from the suffix (``-`` is JSON lines)."""
    if fmt not in FORMATS:
        raise ValueError(f"input format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    if path == STDIN:
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"cannot tell the format of {path!r} from its suffix (known: {sorted(_SUFFIXES)}); "
                         "pass --format jsonl|parquet|csv")
    return _SUFFIXES[suffix]


def count_records(path: str, fmt: InputFormat = "auto") -> int | None:
    """Number of records in ``path`` without parsing them (``None`` for stdin).

    JSON lines count non-empty lines; CSV counts lines minus the header (an estimate when quoted
    fields span lines); Parquet reads the row count from the footer.
    """
    if path == STDIN:
        return None
    kind = resolve_format(path, fmt)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    lines = 0
    last = b"\n"
    blank = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            lines += block.count(b"\n")
            blank += block.count(b"\n\n")
            last = block[-1:]
    if last != b"\n":
        lines += 1
    return max(0, lines - blank - (1 if kind == "csv" else 0))


def read_records(path: str, fmt: InputFormat = "auto", *, fields: Fields = Fields(),
                 batch_rows: int = 4096,
                 on_bad: Callable[[BadRecordError], None] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(where, raw record)`` from a .jsonl / .parquet / .csv file, or JSON lines on stdin (``-``).

    A line that is not a JSON object (or that Python's JSON parser refuses), or a malformed CSV record,
    raises :class:`BadRecordError` naming it; with ``on_bad`` the error is passed to it instead and
    reading goes on with the next line (for CSV: the line after the bad record's start).
    """
    kind = resolve_format(path, fmt)
    if path != STDIN and not Path(path).is_file():
        raise FileNotFoundError(f"input {path!r} does not exist or is not a file")
    if kind == "jsonl":
        yield from _read_jsonl(path, on_bad)
    elif kind == "parquet":
        yield from _read_parquet(path, fields, batch_rows)
    else:
        yield from _read_csv(path, fields, batch_rows, on_bad)


def _read_jsonl(path: str, on_bad: Callable[[BadRecordError], None] | None = None
                ) -> Iterator[tuple[str, dict[str, Any]]]:
    name = "<stdin>" if path == STDIN else path
    f = sys.stdin.buffer if path == STDIN else open(path, "rb")
    try:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                error = BadRecordError(where, f"not valid JSON ({e})")
            except RecursionError:  # valid JSON nested deeper than Python's parser goes
                error = BadRecordError(where, f"JSON nested too deeply to read (over {sys.getrecursionlimit()} "
                                              "levels)")
            except ValueError as e:  # valid JSON Python refuses: an integer of more than 4300 digits
                error = BadRecordError(where, f"JSON value Python cannot read ({str(e).split(':')[0]})")
            else:
                if isinstance(obj, dict):
                    yield where, obj
                    continue
                error = BadRecordError(where, f"expected a JSON object, got {type(obj).__name__}")
            if on_bad is None:
                raise error
            on_bad(error)
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _read_parquet(path: str, fields: Fields, batch_rows: int) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    wanted = [f for f in (fields.id, fields.text, fields.vector) if f is not None]
    have = set(pf.schema_arrow.names)
    missing = [f for f in wanted if f not in have]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {sorted(have)}); "
                         "set --id-field/--text-field/--vector-field")
    _check_kept_in_header(path, fields, pf.schema_arrow.names)
    wanted += [f for f in pf.schema_arrow.names if fields.kept(f)]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted):
        for obj in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", obj


def _read_csv(path: str, fields: Fields, batch_rows: int,
              on_bad: Callable[[BadRecordError], None] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    if _csv_malformed(path, fields):
        # pyarrow would read past an unterminated quote into one value, silently: read this file with the
        # strict reader, which names each malformed record's line (--skip-bad: loses only those lines);
        # its cells are all strings (pyarrow's inferred column types apply to well-formed files)
        yield from _read_csv_strict(path, fields, on_bad)
        return
    import pyarrow as pa
    import pyarrow.csv as pcsv

    # ids and texts stay strings ("007" must not become 7); a vector cell is a JSON array.
    types = {f: pa.string() for f in (fields.id, fields.text, fields.vector) if f is not None}
    reader = pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=False),
                           read_options=pcsv.ReadOptions(block_size=1 << 22))
    have = set(reader.schema.names)
    missing = [f for f in types if f not in have]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} in the header (columns: {sorted(have)}); "
                         "set --id-field/--text-field/--vector-field")
    _check_kept_in_header(path, fields, reader.schema.names)
    row = 0
    for batch in _csv_batches(path, reader, [0]):
        for obj in batch.to_pylist():
            row += 1
            where = f"{path} row {row}"
            if fields.vector is not None and isinstance(obj.get(fields.vector), str):
                try:
                    obj[fields.vector] = json.loads(obj[fields.vector])
                except json.JSONDecodeError:
                    error = BadRecordError(where, f"field {fields.vector!r} must hold a JSON array of numbers")
                    if on_bad is None:
                        raise error from None
                    on_bad(error)
                    continue
            yield where, obj


def _csv_malformed(path: str, fields: Fields) -> bool:
    """Whether the strict :mod:`csv` reading of ``path`` finds a malformed record (one pass, no values kept)."""
    try:
        for _ in _read_csv_strict(path, fields, None):
            pass
    except BadRecordError:
        return True
    except ValueError:  # a header problem: the pyarrow path reports it in its own words
        return False
    return False


class _Lines:
    """The decoded lines of a binary file for :mod:`csv`, counting them (line numbers for messages)."""

    def __init__(self, f: Any, path: str) -> None:
        self.f = f
        self.path = path
        self.lineno = 0  # lines handed out so far

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.f.readline()
        if not line:
            raise StopIteration
        self.lineno += 1
        if self.lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Excel writes one)
            line = line[3:]
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _CsvLineError(f"line {self.lineno} is not valid UTF-8 ({e})") from None


class _CsvLineError(ValueError):
    """A line the CSV reader could not take (raised through :mod:`csv`, caught by :func:`_read_csv`)."""


# Python's csv refuses fields over 128 KiB by default; passages can be megabytes (cut at max_length later).
_CSV_FIELD_LIMIT = 2**31 - 1


def _read_csv_strict(path: str, fields: Fields, on_bad: Callable[[BadRecordError], None] | None = None
              ) -> Iterator[tuple[str, dict[str, Any]]]:
    """CSV records as ``(path:line, dict)``, checked strictly: every record must have the header's number
    of fields, and a quote must open a field and close it (``strict`` mode of :mod:`csv`).

    An unterminated quote would otherwise swallow the rest of the file into one value (3 records read
    of 100, and ``--delete-missing`` deleting the other 97): here it is an error naming the line where
    the record starts. With ``on_bad`` the bad record is reported and reading goes on from the line
    after its start, so only that line is lost. A quoted value may span lines (RFC 4180); ``line`` is
    where its record starts. Ids, texts and other cells stay strings; a vector cell is a JSON array.
    """
    import csv

    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    with open(path, "rb") as f:
        lines = _Lines(f, path)
        reader = csv.reader(lines, strict=True)
        try:
            names = next(reader, None)
        except (csv.Error, _CsvLineError) as e:
            raise ValueError(f"{path}:1: the CSV header cannot be read ({e})") from None
        if not names:
            return
        missing = [f for f in (fields.id, fields.text, fields.vector) if f is not None and f not in names]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} in the header (columns: {sorted(names)}); "
                             "set --id-field/--text-field/--vector-field")
        while True:
            start, offset = lines.lineno + 1, f.tell()
            error: BadRecordError | None = None
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, _CsvLineError) as e:
                span = f" (the record starting there runs to line {lines.lineno}: a quote is not closed where it " \
                       "should be)" if lines.lineno > start else ""
                error = BadRecordError(f"{path}:{start}", f"malformed CSV: {e}{span}")
                # read on from the line after the record's start: only that line is lost
                f.seek(offset)
                f.readline()
                lines.lineno = start
                reader = csv.reader(lines, strict=True)
            else:
                where = f"{path}:{start}"
                if not values:  # a blank line
                    continue
                if len(values) != len(names):
                    error = BadRecordError(where, f"has {len(values)} fields, the header has {len(names)} "
                                                  f"(an unquoted comma, or a quote not closed?)")
                else:
                    obj: dict[str, Any] = dict(zip(names, values))
                    if fields.vector is not None:
                        try:
                            obj[fields.vector] = json.loads(obj[fields.vector])
                        except (json.JSONDecodeError, RecursionError, ValueError):
                            error = BadRecordError(where, f"field {fields.vector!r} must hold a JSON array of "
                                                          "numbers")
                    if error is None:
                        yield where, obj
                        continue
            if on_bad is None:
                raise error
            on_bad(error)


def _check_kept_in_header(path: str, fields: Fields, names: list[str]) -> None:
    """A ``--keep-field`` that a Parquet or CSV file lacks is a typo: say so before anything is read."""
    absent = [k for k in fields.keep or () if k not in names]
    if absent:
        raise ValueError(f"{path}: no column {absent[0]!r} to keep (--keep-field; columns: {sorted(names)})")


def _csv_batches(path: str, reader: Any, counter: list[int]) -> Iterator[Any]:
    """The CSV reader's batches; a value that does not fit the type pyarrow inferred for its column from
    the first block (``abc`` in a column of integers) stops, naming the row and the column."""
    import pyarrow as pa

    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as e:
            raise _csv_conversion_error(path, reader.schema, counter[0], e) from None
        counter[0] += batch.num_rows
        yield batch


def _csv_conversion_error(path: str, inferred: Any, rows_read: int, error: Exception) -> Exception:
    """Locate the value behind a CSV conversion error: read the file again with that column as text,
    from the first row not yet delivered, and find the first value its inferred type cannot hold."""
    import re

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    m = re.search(r"In CSV column #(\d+)", str(error))
    if m is None or int(m.group(1)) >= len(inferred):
        return ValueError(f"{path}: {error}")
    col = inferred.field(int(m.group(1)))
    types = {f.name: (pa.string() if f.name == col.name else f.type) for f in inferred}
    again = pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=False),
                          read_options=pcsv.ReadOptions(block_size=1 << 22))
    def converts(values: Any) -> bool:
        try:
            pc.cast(pc.if_else(pc.equal(values, ""), None, values), col.type)  # an empty cell is null
            return True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False

    row = 0
    for batch in again:
        start, row = max(rows_read - row, 0), row + batch.num_rows
        lo, hi = start, batch.num_rows
        column = batch.column(col.name)
        if start >= hi or converts(column.slice(lo, hi - lo)):
            continue  # the bad value is further on
        while hi - lo > 1:  # bisect: casts of halving slices find the first bad value in O(n) work
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if not converts(column.slice(lo, mid - lo)) else (mid, hi)
        return BadRecordError(f"{path} row {row - batch.num_rows + lo + 1}",
                              f"field {col.name!r} holds {column[lo].as_py()!r:.60}, but its column is {col.type} "
                              "(inferred from the rows before it); make the column's values one type, or leave the "
                              "field out (--keep-field NAME for the others, or --drop-fields)")
    return ValueError(f"{path}: {error}")


def validate_record(raw: dict[str, Any], where: str, *, fields: Fields = Fields(),
                    vector_dim: int | None = None) -> Record:
    """Check one raw record and return it as a :class:`Record`.

    Rules: the id is a non-empty string (an integer is accepted and stored as its decimal string);
    the text is a string; with ``fields.vector`` set, the vector is a list of ``vector_dim`` finite
    numbers (any width when ``vector_dim`` is ``None``).

    Raises
    ------
    BadRecordError
        Naming ``where``, the field and what is wrong with it.
    """
    if fields.id not in raw:
        raise BadRecordError(where, f"missing id field {fields.id!r} (fields: {sorted(raw)[:10]})")
    if raw[fields.id] is None:
        raise BadRecordError(where, f"id field {fields.id!r} is null")
    pid = raw[fields.id]
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid:
        raise BadRecordError(where, f"id field {fields.id!r} must be a non-empty string, got {pid!r:.60}")
    _check_unicode(pid, where, f"id field {fields.id!r}", None)
    if fields.text not in raw:
        raise BadRecordError(where, f"missing text field {fields.text!r} (fields: {sorted(raw)[:10]})", pid)
    if raw[fields.text] is None:
        raise BadRecordError(where, f"text field {fields.text!r} is null", pid)
    text = raw[fields.text]
    if not isinstance(text, str):
        raise BadRecordError(where, f"text field {fields.text!r} must be a string, got {type(text).__name__}", pid)
    _check_unicode(text, where, f"text field {fields.text!r}", pid)
    vector = None
    if fields.vector is not None:
        try:
            vector = _check_vector(raw.get(fields.vector), where, fields.vector, vector_dim)
        except BadRecordError as e:
            e.record_id = pid
            raise
    extra = {k: v for k, v in raw.items() if fields.kept(k)}
    return Record(id=pid, text=text, vector=vector, where=where, extra=extra)


_FLOAT32_MAX = 3.4028234663852886e38
# JSON may escape half of a UTF-16 pair ("\ud800"): json.loads returns it as a lone surrogate, which is
# not Unicode text (UTF-8 cannot encode it): the tokenizer and Arrow would fail on the whole chunk.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(value: str, where: str, what: str, record_id: str | None) -> None:
    found = _SURROGATE.search(value)
    if found is not None:
        raise BadRecordError(where, f"{what} holds a lone UTF-16 surrogate \\u{ord(found.group()):04x} at character "
                                    f"{found.start()}, which is not valid Unicode (not encodable as UTF-8)", record_id)


def _check_vector(value: Any, where: str, name: str, dim: int | None) -> list[float]:
    if value is None:
        raise BadRecordError(where, f"missing vector field {name!r}")
    if not isinstance(value, (list, tuple)):
        raise BadRecordError(where, f"vector field {name!r} must be a list of numbers, got {type(value).__name__}")
    if dim is not None and len(value) != dim:
        raise BadRecordError(where, f"vector field {name!r} has {len(value)} values; the table's vectors have {dim}")
    if not value:
        raise BadRecordError(where, f"vector field {name!r} is empty")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise BadRecordError(where, f"vector field {name!r}[{i}] is not a number: {x!r:.40}")
        if not math.isfinite(x):
            raise BadRecordError(where, f"vector field {name!r}[{i}] is {x} (vectors must be finite)")
        if abs(x) > _FLOAT32_MAX:  # stored as float32: it would become inf there
            raise BadRecordError(where, f"vector field {name!r}[{i}] is {x:g}, beyond float32 (|x| <= 3.4e38)")
    return [float(x) for x in value]


__all__ = ["BadRecordError", "Fields", "Record", "count_records", "read_records", "resolve_format",
           "validate_record", "FORMATS", "InputFormat", "STDIN"]
