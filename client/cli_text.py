"""Text from the command line, a file or standard input, for `rnnserve-client`'s prompts.

A text that is not UTF-8 is refused, naming where it came from and the first byte at fault,
rather than decoded with replacement characters: the model reads characters, and a guessed
decoding (a Latin-1 "é" read as U+FFFD or as "Ã©") would feed it text the user never wrote and
predict after that, with nothing on screen to say so. Converting the text (`iconv -f latin1 -t
utf-8`) is one step for the user; a silently different prompt is a wrong answer.
"""

from __future__ import annotations

import argparse
import os
import sys

STDIN = "-"


def not_utf8(source: str, error: UnicodeDecodeError, offset: int | None = None) -> str:
    """What to say of `source` whose bytes failed to decode: the first byte at fault, at `offset` when known."""
    at = "" if offset is None else f" at offset {offset}"
    return (f"{source} is not UTF-8: byte 0x{error.object[error.start]:02x}{at} ({error.reason}); convert it first, "
            f"e.g. with `iconv -f latin1 -t utf-8`")


def decoded(data: bytes, source: str) -> str:
    """`data` as UTF-8; argparse's error naming `source`, the offset and the byte when it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(not_utf8(source, error, error.start)) from None


def text_argument(value: str) -> str:
    """A text given on the command line, or standard input's whole text for `-`.

    Python hands over an argument's undecodable bytes as lone surrogates (PEP 383), which gRPC
    cannot send: they are turned back into the bytes typed and refused here, before any call.
    """
    if value == STDIN:
        return file_text(STDIN)
    return decoded(os.fsencode(value), "the text")


def file_text(path: str) -> str:
    """The whole text of the file at `path` (`-`: standard input), as it is: its final line break included."""
    if path == STDIN:
        return decoded(sys.stdin.buffer.read(), "standard input")
    try:
        with open(path, "rb") as file:
            return decoded(file.read(), repr(path))
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {error.strerror}") from None


def add_text(parser: argparse.ArgumentParser, name: str, metavar: str, what: str, required: bool = True) -> None:
    """`name`, a text argument (or option, for a name starting with --), and --prompt-file instead of it; at most
    one of the two, and one of them when `required`. `resolve` puts the file's text in `name`'s place."""
    given = parser.add_mutually_exclusive_group(required=required)
    positional = {} if name.startswith("--") else {"nargs": "?"}
    given.add_argument(name, metavar=metavar, type=text_argument, **positional,
                       help=f"{what} ({STDIN} reads standard input)")
    given.add_argument("--prompt-file", metavar="PATH", type=file_text,
                       help=f"read {metavar} from PATH ({STDIN}: standard input), for a long one; the file's "
                            f"text as it is, in UTF-8")
    parser.set_defaults(text_field=name.lstrip("-").replace("-", "_"))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with --prompt-file's text in place of the text argument it stands for."""
    prompt_file = getattr(args, "prompt_file", None)
    if prompt_file is not None:
        setattr(args, args.text_field, prompt_file)
    return args
