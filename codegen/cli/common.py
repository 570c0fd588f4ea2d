"""What every verb of the command line shares (``codegen.cli.main``, ``codegen.cli.tune``): the error
type of a bad command line and the way a verb is added."""

from __future__ import annotations

import argparse
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


class UsageError(ValueError):
    """A bad command line or config selection: the verb prints the message and exits 2."""


def add_verb(
    commands, name: str, handler: Callable[[argparse.Namespace], int], *, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A verb's parser under ``commands`` (from ``add_subparsers()``): help, description, an epilog of
    examples kept as written, and ``handler`` as ``args.handler``."""
    parser = commands.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(handler=handler)
    return parser


def parse_each(texts: Iterable[str], parse: Callable[[str], T], label: str) -> list[T]:
    """``parse`` of every text; its ValueError becomes a UsageError ``"<label>: <reason>"``, where
    ``{text!r}`` in ``label`` names the text that failed."""
    parsed = []
    for text in texts:
        try:
            parsed.append(parse(text))
        except ValueError as error:
            raise UsageError(f"{label.format(text=text)}: {error}") from None
    return parsed


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1 (``--jobs 0`` or ``-1`` is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number (1 or more), got {value}")
    return value
