"""A demo corpus the project makes itself: docstrings of Python's standard library, read at run time.

No download: the modules of ``sys.stdlib_module_names`` are imported (skipping those with side
effects), and the docstrings of each module and of its public functions and classes are cut into
passages of at most ``max_words`` words. Well-known modules come first and each module gives at
most ``per_module`` passages, so a few hundred passages already cover many topics.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import sys
import warnings
from collections.abc import Iterator

# Importing these has side effects (opens a browser, prints, starts Tk, runs tests) or is slow.
_SKIP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
    "venv", "pydoc_data", "__main__", "msilib", "winreg", "winsound", "msvcrt", "_winapi", "nt",
})
# Topics people search for; they come first so that small corpora still answer the demo queries.
_FIRST = (
    "json", "csv", "gzip", "zipfile", "tarfile", "pathlib", "os", "shutil", "subprocess", "re", "datetime",
    "time", "random", "math", "statistics", "collections", "itertools", "functools", "hashlib", "base64",
    "sqlite3", "logging", "argparse", "urllib", "http", "socket", "threading", "asyncio", "string",
    "textwrap", "tempfile", "pickle", "copy", "heapq", "bisect", "uuid", "decimal", "fractions", "glob",
    "io", "struct", "zlib", "email", "html", "xml", "unittest", "doctest", "typing", "dataclasses", "enum",
)


def _modules() -> list[str]:
    names = [n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_") and n not in _SKIP]
    first = [n for n in _FIRST if n in names]
    return first + sorted(set(names) - set(first))


def _chunks(text: str, max_words: int) -> Iterator[str]:
    """Paragraph-aware chunks of at most ``max_words`` words (long paragraphs are split)."""
    buf: list[str] = []
    for para in text.split("\n\n"):
        words = para.split()
        while words:
            room = max_words - len(buf)
            if room <= 0 or (buf and len(words) > room):
                yield " ".join(buf)
                buf = []
                continue
            buf.extend(words[:room])
            words = words[room:]
    if buf:
        yield " ".join(buf)


def _docs(module_name: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of a module and its public functions and classes."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(module_name)
        except ImportError:
            return
    doc = inspect.getdoc(mod)
    if doc:
        yield module_name, doc
    for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", module_name) != module_name:
            continue  # re-exported from elsewhere: counted where it is defined
        doc = inspect.getdoc(obj)
        if doc and len(doc.split()) >= 5:
            yield f"{module_name}.{name}", doc


def stdlib_passages(n: int = 300, *, per_module: int = 6, max_words: int = 80,
                    min_words: int = 8) -> list[dict[str, str]]:
    """Up to ``n`` passages ``{"id": "json.loads", "text": "json.loads: Deserialize ``s`` ..."}``.

    Parameters
    ----------
    n : int, default 300
        Passages wanted (fewer if the standard library runs out).
    per_module : int, default 6
        At most this many passages from one module.
    max_words : int, default 80
        Words per passage at most (a docstring longer than that gives several, ids ``name#2``...).
    min_words : int, default 8
        Shorter chunks are dropped.

    Returns
    -------
    list of dict
        Deterministic for a given Python version.

    Examples
    --------
    >>> from kalm_store.corpus import stdlib_passages
    >>> docs = stdlib_passages(20)
    >>> docs[0]["id"].split(".")[0]
    'json'
    """
    for name, value in (("n", n), ("per_module", per_module), ("max_words", max_words)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for module_name in _modules():
        taken = 0
        for qualname, doc in _docs(module_name):
            for i, chunk in enumerate(_chunks(doc, max_words)):
                if i >= 2:  # at most two chunks of one docstring: leave room for the module's functions
                    break
                if len(chunk.split()) < min_words or chunk in seen:
                    continue
                seen.add(chunk)
                pid = qualname if i == 0 else f"{qualname}#{i + 1}"
                out.append({"id": pid, "text": f"{qualname}: {chunk}"})
                taken += 1
                if len(out) >= n:
                    return out
                if taken >= per_module:
                    break
            if taken >= per_module:
                break
    return out


__all__ = ["stdlib_passages"]
