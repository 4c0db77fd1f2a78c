"""The ``kalm-store`` command line. Each sub-command lives in its own module with ``register``/``run``."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from kalm_store._hints import cli_spelling
from kalm_store.cli._args import parse_args

# Lance deletes rows and drops columns in metadata, rewriting nothing: said by repool and build.
def compact_hint(db: str = "URI", table: str = "NAME") -> str:
    """How the bytes of deleted rows and dropped columns leave the disk, naming the command to run."""
    return ("bytes leave the disk when the data files are compacted and old versions cleaned up "
            f"(`kalm-store optimize --db {db} --table {table}`)")


COMPACT_HINT = compact_hint()

# sub-command -> module under kalm_store.cli; modules import torch/lancedb only inside ``run``.
COMMANDS = {
    "make-test-model": "make_test_model",
    "plan": "plan",
    "repool": "repool",
    "build": "build",
    "info": "info",
    "verify": "verify",
    "optimize": "optimize",
    "search": "search",
    "eval": "eval",
    "finetune": "finetune",
    "serve": "serve",
    "demo": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    from kalm_store import __version__

    parser = argparse.ArgumentParser(
        prog="kalm-store",
        description="KaLM-Reranker-V1 inside LanceDB: build stores of pooled encoder matrices once, "
                    "rerank LanceDB searches from them with the decoder alone.",
    )
    parser.add_argument("--version", action="version", version=f"kalm-store {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of the one-line message; put it "
                             "before the command: kalm-store --debug build ... (default: one line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        import_module(f"kalm_store.cli.{module}").register(sub, name)
    return parser


# Lance's scanner logs a deprecation warning on every hybrid search that selects columns (LanceDB's hybrid
# query gives both legs one select, so neither `_distance` nor `_score` can be asked for): six lines per
# demo query that tell a user nothing. `import kalm_store` already quiets only that module, only if the
# user has not set LANCEDB_LOG (kalm_store._quiet); the setdefault in main is the same value.
from kalm_store._quiet import LANCEDB_LOG_DEFAULT as _LANCEDB_LOG_DEFAULT  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LANCEDB_LOG", _LANCEDB_LOG_DEFAULT)  # read when lancedb is first imported
    parser = build_parser()
    args = parse_args(parser, argv)  # an unknown flag: the sub-command's usage, and "did you mean"
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with cli_spelling():  # error hints name --flags, not Python keywords
            return int(args.run(args) or 0)
    except BrokenPipeError:  # `kalm-store info ... | head`: the reader left; not an error of ours
        # Python would report the pipe again while flushing stdout at exit: point stdout at devnull first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"kalm-store {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line naming the input and what to do; the traceback only with --debug
        if args.debug:
            raise
        print(f"kalm-store {args.command}: error: {_message(e, args)}", file=sys.stderr)
        return 1


def _message(e: Exception, args: argparse.Namespace) -> str:
    from kalm_store.cli.errors import describe
    from kalm_store.store import MissingRowError

    if isinstance(e, MissingRowError):  # a KeyError of ours, not a bug
        return str(e)
    return describe(e, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
