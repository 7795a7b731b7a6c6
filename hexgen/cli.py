"""`hexgen` command line: one sub-command per module in hexgen/commands; user errors become one line."""

from __future__ import annotations

import argparse
import copy
import sys
from importlib.metadata import PackageNotFoundError, metadata, version

from hexgen.commands import COMMANDS
from hexgen.errors import UserError


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends each option's help with "(default: X)" unless it has no default or its help already names one."""

    def add_argument(self, action: argparse.Action) -> None:
        shown = _shown_default(action.default)
        if shown is not None and "default" not in (action.help or ""):
            action = copy.copy(action)  # the parser's own action stays as registered
            action.help = f"{action.help or ''} (default: {shown.replace('%', '%%')})".lstrip()
        super().add_argument(action)


def _shown_default(default) -> str | None:
    """A default worth printing, as the user would type it; None for no value, flags and empty lists."""
    if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default == []:
        return None
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; sub-command parsers inherit it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def _summary_and_version() -> tuple[str, str]:
    """hexgen's one-line description and version from its package metadata; a source checkout on PYTHONPATH
    that was never installed (as on the GPU machine, whose image has its own torch) has none."""
    try:
        return metadata("hexgen")["Summary"], version("hexgen")
    except PackageNotFoundError:
        import hexgen

        return (hexgen.__doc__ or "hexgen").strip(), "(source checkout, not installed)"


def build_parser() -> argparse.ArgumentParser:
    summary, installed_version = _summary_and_version()
    parser = Parser(prog="hexgen", description=summary)
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost sub-command parser the arguments chose (`hexgen bench engine`'s for `bench engine ...`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    chosen = _chosen_parser(parser, args)
    if unknown:  # refused by the sub-command, whose usage and name the user needs, not by the top-level parser
        chosen.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"{chosen.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{chosen.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
