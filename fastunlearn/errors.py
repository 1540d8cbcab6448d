"""One exception type for every user-facing error, and the CLI wrapper that prints it in one line."""
from __future__ import annotations

import functools
import sys


class FastUnlearnError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line and exits 2."""


def cli_errors(main):
    """Decorate a CLI entry point: FastUnlearnError (and Ctrl-C) become one line on stderr, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except FastUnlearnError as exc:
            print(f"fastunlearn: error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("fastunlearn: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
