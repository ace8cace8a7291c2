"""The runtime's error type and its one-line error text (numpy-free, torch-free).

Every bad input, option or engine folder raises :class:`InputError`, whose message is one line
that starts with the offending path or option; the CLIs print it after ``<prog>: error:`` and
exit with code 2. :func:`first_line` is the one way to turn any exception into such a line.
"""

from __future__ import annotations

import os

PathLike = str | os.PathLike[str]


class InputError(ValueError):
    """A bad input file or folder; the message is one line naming the path."""

    def __init__(self, path: PathLike, problem: str | None = None) -> None:
        """Build ``"<path>: <problem>"`` collapsed onto one line.

        Args:
            path: The offending file or folder, as the user gave it (or, with ``problem``
                omitted, a complete message).
            problem: What is wrong and what was expected.
        """
        self.path = str(path) if problem is not None else ""
        text = str(path) if problem is None else f"{path}: {problem}"
        super().__init__(" ".join(text.split()))


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an exception's message.

    Args:
        exc: Any exception.
        default: Text for an empty message (None: the exception's type name).
    """
    lines = str(exc).strip().splitlines()
    if lines:
        return lines[0].strip()
    return type(exc).__name__ if default is None else default
