"""How a failed command is reported: one line naming the input (file, table) and what to do.

``kalm-store --debug COMMAND ...`` re-raises instead, so the traceback is there when it is needed.
The classification goes by what failed, never by words in a message: the OS error number (also the
"(os error N)" of Lance's Rust errors), the exception's class, and, for a table the command names,
what :func:`kalm_store.diagnose.diagnose_table` finds damaged in its files.
"""

from __future__ import annotations

import argparse
import errno

# Errors of ours and of the libraries that describe bad input or a bad environment; anything else is a
# bug of kalm-store and says so.
_USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def describe(e: BaseException, args: argparse.Namespace) -> str:
    """The one-line message (without the ``kalm-store CMD: error:`` prefix) for ``e`` raised by ``args.run``."""
    from kalm_store.diagnose import diagnose_table, one_line, os_errno

    db, table = getattr(args, "db", None), getattr(args, "table", None)
    where = f"table {table!r} in {db}" if isinstance(db, str) and isinstance(table, str) else "the output"
    code = os_errno(e)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        resume = ("every chunk committed before it is kept: free space and run the same command again, it "
                  "resumes" if args.command == "build" else "nothing committed is lost: free space and run the "
                  "same command again")
        return f"no space left on the device while writing {where} ({one_line(e, 200)}); {resume}"
    if isinstance(db, str) and isinstance(table, str):
        try:
            found = diagnose_table(db, table)
        except Exception:  # noqa: BLE001 - a failed look is no finding; the original error is reported
            found = None
        if found is not None:
            return found
    if isinstance(e, RuntimeError) and where != "the output":  # Lance's errors: say which table they are about
        return f"{where}: {one_line(e)}"
    if isinstance(e, _USER_ERRORS):
        return one_line(e)
    return (f"internal error {type(e).__name__}: {one_line(e, 300)} (a bug in kalm-store: run it again as "
            f"`kalm-store --debug {args.command} ...` for the traceback, and report it)")


__all__ = ["describe"]
