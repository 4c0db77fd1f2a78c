"""Flag types shared by several sub-commands (kept free of heavy imports: ``--help`` stays cheap)."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """argparse type of ``--ratio``/``--ratios``: one ratio (``4``) or a comma list (``4,8``).

    Only the syntax is checked here; the values are checked with the other options (a ratio outside
    1, 2, 4, ..., 32 is the command's one-line error, naming the allowed ones).
    """
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a ratio or a comma list of ratios such as 4,8, got {text!r}") from None


def add_ratios_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--ratio R`` and ``--ratios R,R``, the same flag: repeated and comma-listed values all add up
    (``--ratios 4 --ratios 8`` and ``--ratio 4,8`` both mean 4 and 8), into ``args.ratios``
    (``None`` when not given)."""
    parser.add_argument("--ratio", "--ratios", dest="ratios", type=int_list, action="extend", default=None,
                        metavar="R[,R...]", help=help)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that an unknown flag of a sub-command is reported with that
    sub-command's usage (argparse reports it with the top-level one) and a "did you mean" when one
    of its flags is close."""
    import difflib

    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    command = getattr(args, "command", None)
    target = subparsers[0].choices.get(command, parser) if subparsers and command else parser
    flags = [s for a in target._actions for s in a.option_strings]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], flags, n=1, cutoff=0.6)
            if close:
                hints.append(f"{extra.split('=', 1)[0]}: did you mean {close[0]}?")
    target.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))
    raise AssertionError("unreachable: ArgumentParser.error exits")  # pragma: no cover
