"""The stored table's layout, read from ``schemas/passage_store.v2.json`` (package data).

Nothing here restates the file: the Arrow schema and the metadata keys are derived from it, so the
JSON stays the single declaration of what a kalm-store table is.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import pyarrow as pa

from .pooling import check_ratio

SCHEMA_FILE = "passage_store.v2.json"
CODEC = "zstd-frame/float16-rowmajor/v1"
DIGEST_COLUMN = "text_digest"  # declared in the schema file; its value is computed by kalm_store.store.text_digest


@lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    """The parsed schema file."""
    return json.loads(resources.files("kalm_store.schemas").joinpath(SCHEMA_FILE).read_text("utf-8"))


def column_name(ratio: int) -> str:
    """Column holding the matrices of ``ratio``: ``kalm_r{ratio}``."""
    return _ratio_column()["name_pattern"].format(ratio=check_ratio(ratio))


def ratio_of_column(name: str) -> int | None:
    """Inverse of :func:`column_name`; ``None`` for other columns."""
    prefix = _ratio_column()["name_pattern"].split("{")[0]
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return int(name[len(prefix):])
    return None


def _ratio_column() -> dict[str, Any]:
    return next(c for c in spec()["columns"] if c.get("per_ratio"))


def _arrow_type(type_name: str, size: int | None) -> pa.DataType:
    if type_name == "fixed_size_list<float32>":
        if not size:
            raise ValueError("a fixed_size_list column needs its size")
        return pa.list_(pa.float32(), size)
    return {"string": pa.string(), "int32": pa.int32(), "large_binary": pa.large_binary(),
            "fixed_size_binary(8)": pa.binary(8)}[type_name]


def ratio_field(ratio: int) -> pa.Field:
    """Arrow field of the ``kalm_r{ratio}`` column, with its Lance encoding metadata."""
    col = _ratio_column()
    return pa.field(column_name(ratio), _arrow_type(col["type"], None), nullable=col["nullable"],
                    metadata=col.get("field_metadata"))


def arrow_schema(ratios: list[int], vector_dim: int | None, metadata: dict[str, Any],
                 version: int | None = None) -> pa.Schema:
    """The Arrow schema of a table storing ``ratios``, with (``vector_dim`` set) or without a vector,
    in the layout of schema ``version`` (default: the current one)."""
    version = spec()["schema_version"] if version is None else version
    fields: list[pa.Field] = []
    for col in spec()["columns"]:
        if col.get("since_version", 1) > version:
            continue
        if col.get("per_ratio"):
            fields.extend(ratio_field(r) for r in sorted(ratios))
        elif col["name"] == "vector" and vector_dim is None:
            continue
        else:
            fields.append(pa.field(col["name"], _arrow_type(col["type"], vector_dim), nullable=col["nullable"]))
    return pa.schema(fields, metadata=encode_metadata(metadata))


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """Prefix and JSON-encode table metadata; unknown keys are refused."""
    known = spec()["metadata"]
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown table metadata keys {sorted(unknown)}; the schema file declares {sorted(known)}")
    prefix = spec()["metadata_prefix"]
    return {prefix + k: json.dumps(v) for k, v in values.items()}


def decode_metadata(raw: dict[bytes | str, bytes | str] | None) -> dict[str, Any]:
    """The kalm-store metadata of a table's Arrow schema (empty when it has none)."""
    prefix = spec()["metadata_prefix"]
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        key = k.decode() if isinstance(k, bytes) else k
        if key.startswith(prefix):
            out[key[len(prefix):]] = json.loads(v.decode() if isinstance(v, bytes) else v)
    return out


def must_match_keys() -> list[str]:
    """Metadata keys that must be equal between a table and the model or build writing/reading it."""
    return [k for k, v in spec()["metadata"].items() if v.get("must_match")]
