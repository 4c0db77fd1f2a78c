"""Find what is damaged in a table folder after a command failed on it, and say how to repair it.

Lance's errors for a damaged table name neither the file nor a repair ("file size is too small",
"failed to fill whole buffer"). When a command fails, :func:`diagnose_table` looks at the table's
files on a local disk (object stores are not inspected): the latest version's manifest must open,
and every data file of that version must exist with the size the manifest recorded. It reads only
metadata and file sizes, so it costs milliseconds, and it runs only on the error path.
"""

from __future__ import annotations

import re
from pathlib import Path

# Lance's V2 manifest names count down from u64::MAX so that the newest sorts first.
_U64_MAX = 2**64 - 1


def table_folder(db_uri: str, table: str) -> Path | None:
    """The local folder of ``table`` in ``db_uri``, ``None`` for object-store URIs or a missing folder."""
    if "://" in db_uri and not db_uri.startswith("file://"):
        return None
    folder = Path(db_uri.removeprefix("file://")).expanduser() / f"{table}.lance"
    return folder if folder.is_dir() else None


def _versions(folder: Path) -> list[tuple[int, Path]]:
    """``(version, manifest path)`` of every manifest in ``_versions``, newest first."""
    out = []
    for path in (folder / "_versions").glob("*.manifest"):
        try:
            n = int(path.stem)
        except ValueError:
            continue
        out.append((_U64_MAX - n if n > _U64_MAX // 2 else n, path))  # V2 names count down, V1 names up
    return sorted(out, reverse=True)


def diagnose_table(db_uri: str, table: str) -> str | None:
    """One sentence naming the damaged file of ``table`` and the repair, or ``None`` when none is found."""
    import lance

    folder = table_folder(db_uri, table)
    if folder is None:
        return None
    versions = _versions(folder)
    if not versions:
        return None  # no commit yet: the store reports this case itself
    latest, manifest = versions[0]
    try:
        ds = lance.dataset(str(folder), version=latest)
    except Exception as e:  # noqa: BLE001 - any failure to open the newest manifest is the finding
        older = next((v for v, _ in versions[1:] if _opens(folder, v)), None)
        back = (f"move it out of _versions/ to go back to version {older} (the newest commit is lost)"
                if older is not None else "no older version opens either: restore the table folder from a backup")
        return (f"table {table!r}: its newest version file {manifest} (version {latest}, "
                f"{manifest.stat().st_size} bytes) is damaged ({_short(e)}); restore that file from a backup, or "
                f"{back}")
    for frag in ds.get_fragments():
        for data in frag.metadata.files:
            path = folder / "data" / data.path
            expected = getattr(data, "file_size_bytes", None)
            if not path.is_file():
                return (f"table {table!r}: data file {path} (fragment {frag.fragment_id}, "
                        f"{frag.metadata.physical_rows} rows) is missing; restore it from a backup, or rebuild the "
                        f"table from its input into a new table")
            size = path.stat().st_size
            if expected and size != expected:
                return (f"table {table!r}: data file {path} (fragment {frag.fragment_id}, "
                        f"{frag.metadata.physical_rows} rows) is damaged: {size} bytes on disk, {expected} written; "
                        f"restore it from a backup, or rebuild the table from its input into a new table")
    return None


def _opens(folder: Path, version: int) -> bool:
    import lance

    try:
        lance.dataset(str(folder), version=version)
    except Exception:  # noqa: BLE001 - the question is only whether it opens
        return False
    return True


# Lance appends the Rust source location of each error (", /root/.cargo/registry/src/index.crates.io-.../x.rs:17:9"):
# of no use to a user, and it is what made "index" appear in every Lance message.
_RUST_LOCATION = re.compile(r",?\s*/[^\s,]*\.rs:\d+:\d+")


def one_line(e: BaseException, limit: int = 600) -> str:
    """``e``'s message on one line: Rust source locations dropped, whitespace collapsed, at most ``limit`` chars."""
    text = " ".join(_RUST_LOCATION.sub("", str(e)).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_errno(e: BaseException) -> int | None:
    """The OS error number of ``e``: its ``errno``, or the "(os error N)" Lance's Rust errors carry."""
    if isinstance(e, OSError) and e.errno is not None:
        return int(e.errno)
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None


def _short(e: BaseException) -> str:
    return one_line(e, 200)


__all__ = ["diagnose_table", "one_line", "os_errno", "table_folder"]
