"""Where a store lives: local folders and object-store URIs (``s3://bucket/prefix``, ``gs://``, ``az://``).

One function, :func:`storage_options`, turns a database URI, the environment and the user's
``--storage-option KEY=VALUE`` flags into the ``storage_options`` dict that LanceDB and Lance take
(``lancedb.connect(uri, storage_options=...)``, ``lance.dataset(uri, storage_options=...)``). Every
command that opens a store calls it, so ``--db s3://...`` means the same thing everywhere.

Environment read for ``s3://`` URIs (standard AWS names; explicit ``--storage-option`` wins):

==========================================  ==========================
variable                                    storage option
==========================================  ==========================
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` ``endpoint`` (S3-compatible servers: MinIO, Ceph, R2...)
``AWS_REGION``/``AWS_DEFAULT_REGION``       ``region``
``AWS_ACCESS_KEY_ID``                       ``aws_access_key_id``
``AWS_SECRET_ACCESS_KEY``                   ``aws_secret_access_key``
``AWS_SESSION_TOKEN``                       ``aws_session_token``
==========================================  ==========================

An ``http://`` endpoint also sets ``allow_http=true``. Credentials are copied into the dict because
distributed workers (Ray) may run where the driver's environment is not; without them in the
environment, Lance falls back to its own chain (instance profile, ``~/.aws``...).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss")

# storage option <- environment variables, first one set wins
_S3_ENV: dict[str, tuple[str, ...]] = {
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
}


def scheme(uri: str) -> str | None:
    """The object-store scheme of ``uri`` (``"s3"``...), or ``None`` for a local path."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"database URI must be a non-empty string, got {uri!r}")
    head, sep, _ = uri.partition("://")
    if not sep:
        return None
    head = head.lower()
    if head == "file":
        return None
    if head not in OBJECT_STORE_SCHEMES:
        raise ValueError(f"unsupported database URI scheme {head!r} in {uri!r}; use a local folder or one of "
                         f"{', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)}")
    return head


def is_object_store(uri: str) -> bool:
    """True for ``s3://``, ``gs://``, ``az://``... URIs."""
    return scheme(uri) is not None


def connect(db_uri: str, storage_options: dict[str, str] | None = None, *, must_exist: bool = False) -> Any:
    """``lancedb.connect``, with one clear ``OSError`` when an object store cannot be reached.

    ``must_exist``: LanceDB creates a missing local folder on connect; commands that only read (search,
    info, plan, repool) refuse it instead, so a mistyped ``--db`` is an error, not a new empty folder.
    """
    import lancedb

    from . import embedders  # noqa: F401  (registers the embedding function tables of offline models record)

    if not is_object_store(db_uri):
        path = Path(db_uri[len("file://"):] if db_uri.startswith("file://") else db_uri).expanduser()
        if must_exist and not path.is_dir():
            raise FileNotFoundError(f"database {db_uri!r} does not exist (no such folder); build a store there "
                                    "first with `kalm-store build`")
        if (path / "_versions").is_dir():  # a Lance dataset: one table's folder, NAME.lance, inside the database
            from ._hints import option

            name = path.name[:-len(".lance")] if path.name.endswith(".lance") else path.name
            raise ValueError(f"{option('db_uri', '--db')} {db_uri!r} is the folder of one table, not a database: "
                             f"pass its parent folder {str(path.parent)!r} as {option('db_uri', '--db')} and "
                             f"{option(f'table={name!r}', f'--table {name}')}")
        return lancedb.connect(db_uri, storage_options=storage_options)
    try:
        return lancedb.connect(db_uri, storage_options=storage_options)
    except (OSError, ValueError) as e:  # LanceDB reports object-store failures as ValueError("Invalid input, ...")
        raise object_store_error(db_uri, e) from e


def object_store_error(db_uri: str, error: BaseException) -> OSError:
    """One readable error for an object store that failed, from Lance's nested Rust debug output."""
    import re

    message = str(error)
    causes = re.findall(r'message: "([^"]+)"', message) or re.findall(r"source: (\w+) \}", message)
    where = re.search(r"uri: Some\(([^)\s]+)\)", message)
    cause = (causes[-1] + (f" at {where.group(1)}" if where else "")) if causes else message.splitlines()[0][:300]
    return OSError(f"could not reach {db_uri}: {cause}. Check the endpoint, region and credentials "
                   "(AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or --storage-option)")


def parse_storage_option(item: str) -> tuple[str, str]:
    """Parse one ``KEY=VALUE`` flag (``argparse`` type of ``--storage-option``)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"storage option must look like KEY=VALUE (e.g. region=us-east-1), got {item!r}")
    return key, value


def storage_options(
    uri: str,
    overrides: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str] | None:
    """The Lance/LanceDB ``storage_options`` for the database at ``uri``.

    Parameters
    ----------
    uri : str
        Database URI: a local folder or ``s3://bucket/prefix`` (``gs://``, ``az://`` take only overrides).
    overrides : mapping or iterable of (key, value), optional
        Explicit options (the CLI's repeated ``--storage-option KEY=VALUE``); they win over the environment.
    environ : mapping, optional
        Environment to read; default ``None`` reads ``os.environ``.

    Returns
    -------
    dict or None
        ``None`` for a local path without overrides (LanceDB's default), else the options.

    Examples
    --------
    >>> storage_options("s3://bucket/db", {"endpoint": "http://127.0.0.1:9000"}, environ={})
    {'endpoint': 'http://127.0.0.1:9000', 'allow_http': 'true'}
    >>> storage_options("./db") is None
    True
    """
    kind = scheme(uri)
    env = os.environ if environ is None else environ
    given = dict(overrides.items() if isinstance(overrides, Mapping) else (overrides or []))
    for k, v in given.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"storage options must map str to str, got {k!r}: {v!r}")
    opts: dict[str, str] = {}
    if kind in ("s3", "s3a"):
        for option, names in _S3_ENV.items():
            value = next((env[n] for n in names if env.get(n)), None)
            if value is not None:
                opts[option] = value
    opts.update(given)
    endpoint = opts.get("endpoint") or opts.get("aws_endpoint")
    if endpoint and endpoint.startswith("http://") and "allow_http" not in opts:
        opts["allow_http"] = "true"
    return opts or None


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--storage-option KEY=VALUE`` flag (collected into ``args.storage_option``)."""
    parser.add_argument(
        "--storage-option", action="append", type=parse_storage_option, default=[], metavar="KEY=VALUE",
        help="object-store option for --db s3://... (repeatable), e.g. endpoint=http://127.0.0.1:9000, "
             "region=us-east-1; default: taken from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, "
             "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN")


def options_from_args(args: argparse.Namespace, uri_attr: str = "db") -> dict[str, str] | None:
    """:func:`storage_options` for a parsed command line (its ``--db`` and ``--storage-option`` flags)."""
    return storage_options(getattr(args, uri_attr), getattr(args, "storage_option", None) or [])


def table_uri(db_uri: str, table: str) -> str:
    """The Lance dataset URI of ``table`` in the LanceDB database at ``db_uri``."""
    return db_uri.rstrip("/") + "/" + table + ".lance"


__all__ = ["storage_options", "parse_storage_option", "add_storage_arguments", "options_from_args",
           "is_object_store", "scheme", "table_uri"]
