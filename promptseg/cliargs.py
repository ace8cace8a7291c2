"""click pieces shared by every promptseg command line (no torch).

Usage errors are one line naming the program and the option (``promptseg-run: error:
--threads: must be an integer >= 1, got '0'``) with exit status 2 and no traceback; ``--help``
shows defaults; ``--version`` prints the package version.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

import click

CONTEXT: dict[str, Any] = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "max_content_width": 100,
}


class IntAtLeast(click.ParamType):
    """An integer >= ``minimum``."""

    name = "integer"

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= self.minimum:
            return value
        try:
            number = int(str(value))
        except ValueError:
            number = None
        if number is None or number < self.minimum:
            self.fail(f"must be an integer >= {self.minimum}, got {str(value)!r}", param, ctx)
        return number


positive_int = IntAtLeast(1)
non_negative_int = IntAtLeast(0)


def version_option(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--version``: ``<prog> <promptseg version>``."""
    import promptseg

    return click.version_option(
        promptseg.__version__, "--version", prog_name=prog, message="%(prog)s %(version)s"
    )


def _one_line(exc: click.UsageError) -> str:
    missing = isinstance(exc, click.MissingParameter)
    if isinstance(exc, click.BadParameter) and exc.param is not None and not missing:
        opts = getattr(exc.param, "opts", None) or [exc.param.name or "?"]
        name = max(opts, key=len) if exc.param.param_type_name == "option" else opts[0].upper()
        text = f"{name}: {exc.message}"
    else:
        text = exc.format_message()
    return " ".join(text.split())


def expand_multiple(argv: Sequence[str], names: Collection[str]) -> list[str]:
    """``--opt a b c`` -> ``--opt a --opt b --opt c`` for options that take several values.

    Keeps the argparse ``nargs="+"`` spelling working on click's ``multiple=True`` options:
    the values are the tokens after the option up to the next one starting with ``-``.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        out.append(token)
        i += 1
        if token in names:
            first = True
            while i < len(argv) and (first or not argv[i].startswith("-")):
                if not first:
                    out.append(token)
                out.append(argv[i])
                first = False
                i += 1
    return out


def run_command(
    command: click.Command,
    prog: str,
    argv: Sequence[str] | None,
    multiple: Collection[str] = (),
) -> int:
    """Run a click command; usage errors become one line on stderr and exit status 2.

    Returns the command's return value (an int exit status; None counts as 0).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = command.main(
            args=expand_multiple(args, multiple), prog_name=prog, standalone_mode=False
        )
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else prog
        if isinstance(command, click.Group) and not args:
            message = f"missing command (usage: {prog} COMMAND [OPTIONS]; see {prog} --help)"
        else:
            message = _one_line(exc)
        print(f"{where}: error: {message}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
