"""Input fields beyond id, text and vector, kept as columns of the table (``url``, ``title``, ``date``...).

Users store metadata next to passages to filter (``search --where "source = 'docs'"``) and to show
(``--field url``). Each kept field becomes one nullable column whose Arrow type is fixed once: by the
table's column of that name when there is one, else by the first non-null value met (pyarrow's own
inference: a JSON string is ``string``, an integer ``int64``, a number ``double``, true/false ``bool``,
a list ``list<...>``, an object ``struct<...>``). The table schema is the record of those types, so
they hold across chunks, resumed builds, both engines and later ``--update`` runs. A later value that
the column's type cannot hold unchanged (``2020.5`` in an ``int64`` column, a string in a number
column, an object with a key its struct lacks) is a bad record naming the input line and the field.

Columns built from input fields carry the field metadata :data:`FROM_INPUT`: a build writes every
such column (null where a record lacks the field), so ``--update`` replaces a changed record's kept
fields; columns a user added with LanceDB are written only when the input holds a field of that name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import schema

if TYPE_CHECKING:  # pragma: no cover
    from .records import Record

# Field metadata of a column made from an input field (a key in the kalm-store metadata namespace).
FROM_INPUT: dict[bytes, bytes] = {(schema.spec()["metadata_prefix"] + "from_input").encode(): b"true"}


def reserved(name: str) -> bool:
    """True for names an input field cannot take as a column: the stored columns, the ``kalm_r*``
    pattern, and leading ``_`` (LanceDB's ``_rowid``, ``_distance``, ``_score``, ``_relevance_score``)."""
    stored = {c["name"] for c in schema.spec()["columns"] if "name" in c}
    return name in stored or schema.ratio_of_column(name) is not None or name.startswith("_")


def check_keep(keep: Sequence[str] | None) -> None:
    """Refuse ``--keep-field`` names that cannot be columns (before anything is read)."""
    for name in keep or ():
        if not isinstance(name, str) or not name:
            raise ValueError(f"--keep-field needs a field name, got {name!r}")
        if reserved(name):
            raise ValueError(f"--keep-field {name!r}: that name is taken by a column kalm-store stores "
                             "(id, text, vector, n_tokens, text_digest, kalm_r*, or a leading _)")


def is_input_column(f: pa.Field) -> bool:
    """True for a column a build made from an input field."""
    return bool(f.metadata) and all(f.metadata.get(k) == v for k, v in FROM_INPUT.items())


def user_columns(table_schema: pa.Schema) -> dict[str, pa.Field]:
    """Columns of the table that are not kalm-store's own (kept input fields and columns added by hand)."""
    return {f.name: f for f in table_schema if not reserved(f.name)}


def same_value(stored: Any, given: Any) -> bool:
    """Whether a value read back from Arrow is the value given (NaN equals NaN, a missing struct key
    equals null, a whole float an integer)."""
    if isinstance(stored, float) and isinstance(given, (int, float)) and not isinstance(given, bool):
        return stored == given or (math.isnan(stored) and math.isnan(given))
    if isinstance(stored, dict) and isinstance(given, Mapping):
        return set(given) <= set(stored) and all(same_value(stored[k], given.get(k)) for k in stored)
    if isinstance(stored, list) and isinstance(given, (list, tuple)):
        return len(stored) == len(given) and all(same_value(a, b) for a, b in zip(stored, given))
    if isinstance(given, bool) or isinstance(stored, bool):
        return type(stored) is type(given) and stored == given
    return bool(stored == given)


def _fits(value: Any, type_: pa.DataType) -> bool:
    """Does ``type_`` hold ``value`` unchanged? (pyarrow alone truncates 2020.5 into int64, drops keys
    a struct lacks.)"""
    try:
        got = pa.array([value], type=type_)[0].as_py()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError, ValueError):
        return False
    if pa.types.is_floating(type_) and isinstance(got, float) and isinstance(value, (int, float)) \
            and not isinstance(value, bool) and type_ != pa.float64():
        return math.isclose(got, value, rel_tol=1e-3) or (math.isnan(got) and math.isnan(value))  # float32 rounds
    return same_value(got, value)


def _has_null_type(t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _has_null_type(t.value_type)
    if pa.types.is_struct(t):
        return any(_has_null_type(t.field(i).type) for i in range(t.num_fields))
    return False


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def declared_types(path: str, fmt: str = "auto") -> dict[str, pa.DataType]:
    """The column types a Parquet input declares (dictionary-encoded ones as their values' type);
    empty for JSON lines and CSV, whose types are inferred from the values."""
    from .records import STDIN, resolve_format

    if path == STDIN or resolve_format(path, fmt) != "parquet":  # type: ignore[arg-type]
        return {}
    import pyarrow.parquet as pq

    return {f.name: f.type.value_type if pa.types.is_dictionary(f.type) else f.type
            for f in pq.ParquetFile(path).schema_arrow}


class InputColumns:
    """The kept input fields of one build: their Arrow types, checked per record, and their columns.

    Parameters
    ----------
    table_schema : pyarrow.Schema, optional
        The existing table's schema (its columns fix the types); ``None`` for a table not created yet.
    keep : sequence of str, optional
        The fields to keep (``--keep-field``); ``None`` keeps every field, ``()`` none (``--drop-fields``).
    declared : mapping of str to pyarrow.DataType, optional
        Types the input itself declares (a Parquet file's schema, see :func:`declared_types`); they win
        over inference from values for columns the table does not have yet.
    """

    def __init__(self, table_schema: pa.Schema | None = None, keep: Sequence[str] | None = None,
                 declared: Mapping[str, pa.DataType] | None = None) -> None:
        self.keep = None if keep is None else tuple(keep)
        self.declared = dict(declared or {})
        self.table_fields = user_columns(table_schema) if table_schema is not None else {}
        self.types: dict[str, pa.DataType] = {}  # column -> type, for every column this build writes
        self.origin: dict[str, str] = {}  # column -> what fixed its type ("the table", "c.jsonl:3")
        self.new: list[pa.Field] = []  # columns this build met that the table lacks (not yet created)
        self.checked_names: set[str] = set()  # field names already checked against the reserved ones
        for name, f in self.table_fields.items():
            if (self.keep is None and is_input_column(f)) or (self.keep is not None and name in self.keep):
                self.types[name], self.origin[name] = f.type, f"the table's column {name!r}"

    def check(self, rec: Record) -> None:
        """Fix the type of each field met for the first time; refuse a value its column cannot hold.

        Raises
        ------
        BadRecordError
            Naming the record's input line, the field, the value and the column's type.
        """
        from .records import BadRecordError

        for name, value in rec.extra.items():
            if name not in self.types and name not in self.checked_names:
                if reserved(name):
                    hint = " (pass --vector-field vector to store it as the retrieval vector)" if name == "vector" else ""
                    raise BadRecordError(rec.where, f"field {name!r} has the name of a column kalm-store stores itself"
                                                    f"{hint}; rename it in the input, or choose the fields to keep "
                                                    "with --keep-field NAME, or --drop-fields", rec.id)
                self.checked_names.add(name)
            if value is None:
                continue
            t = self.types.get(name)
            if t is None:
                f = self.table_fields.get(name)
                if f is not None:  # a column added by hand that the input now fills
                    self.types[name], self.origin[name] = f.type, f"the table's column {name!r}"
                    t = f.type
                else:
                    try:
                        inferred = self.declared.get(name) or pa.array([value]).type
                    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                        raise BadRecordError(rec.where, f"field {name!r} holds {value!r:.60}, which no Arrow type "
                                                        f"holds ({e}); drop it with --drop-fields or --keep-field",
                                             rec.id) from None
                    if _has_null_type(inferred):  # e.g. an empty list: its type shows with a later value
                        continue
                    self.types[name], self.origin[name] = inferred, rec.where
                    self.new.append(pa.field(name, inferred, nullable=True, metadata=FROM_INPUT))
                    continue
            if not _fits(value, t):
                raise BadRecordError(
                    rec.where, f"field {name!r} holds {_kind(value)} ({value!r:.60}), but its column is {t} (set by "
                               f"{self.origin[name]}); make the input's values of {name!r} one type, or leave the "
                               "field out (--keep-field NAME for the others, or --drop-fields)", rec.id)

    def take_new(self) -> list[pa.Field]:
        """The columns met since the last call that the table lacks (to create before writing)."""
        out, self.new = self.new, []
        return out

    def table(self, records: Sequence[Record]) -> pa.Table | None:
        """The kept columns of ``records`` (null where a record lacks a field); ``None`` without any."""
        if not self.types:
            return None
        return pa.table({name: pa.array([r.extra.get(name) for r in records], type=t)
                         for name, t in self.types.items()})


__all__ = ["FROM_INPUT", "InputColumns", "check_keep", "declared_types", "is_input_column", "reserved", "same_value", "user_columns"]
