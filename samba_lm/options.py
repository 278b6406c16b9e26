"""What users type, checked once for every command: output directories, lists and JSON values, and
help that shows each default. Devices are checked by loading.resolve_device.

The library functions behind the commands use these checks too, so `train(cfg)` and `samba-lm train`
refuse a bad value with the same words, before any work.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

K = 1024
DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"


# ----------------------------------------------------------------------------- values
def first_line(error: BaseException) -> str:
    """An exception's message, cut to one line for an error that must fit on one."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_out_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a directory to write into; refused when it, or the first of its parents that exists,
    is a file or cannot be written, so that a run fails before its work rather than at its end."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise ValueError(f"{what} {path} is a file, not a directory{where}: give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write into {existing} (permission denied)")
    return path


def parse_count(text: str) -> int:
    """A token count: 4096, 4K (= 4096) or 1M (= 1048576)."""
    item = text.strip().upper()
    scale = {"K": K, "M": K * K}.get(item[-1:], 1)
    digits = item[:-1] if scale > 1 else item
    if not digits.isdigit():
        raise ValueError(f"{text!r} is not a token count: an integer, optionally with K (x1024) or M (x1048576)")
    return int(digits) * scale


def json_object(text: str) -> dict:
    """A JSON object given on the command line, e.g. '{"d_model": 512}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e.msg} at character {e.pos}); "
                                         """write an object such as '{"d_model": 512}'""") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; write one such as '{{\"d_model\": 512}}'")
    return value


# ----------------------------------------------------------------------------- argparse
class ListOption(argparse.Action):
    """A list flag with one syntax for every command: items separated by commas, spaces or both,
    `--lengths 4K,8K,16K` = `--lengths 4K 8K 16K`. `item` parses one item; `count` fixes how many."""

    def __init__(self, option_strings, dest, item: Callable = str, count: int | None = None,
                 keep_whole: Callable[[str], bool] | None = None, **kwargs):
        kwargs.setdefault("metavar", "ITEM,ITEM,...")
        super().__init__(option_strings, dest, nargs="+", **kwargs)
        self.item, self.count, self.keep_whole = item, count, keep_whole

    def __call__(self, parser, namespace, values, option_string=None):
        pieces = [piece.strip() for value in values
                  for piece in ([value] if self.keep_whole and self.keep_whole(value) else value.split(","))]
        items = [self._parse(parser, option_string, p) for p in pieces if p]
        if not items or (self.count is not None and len(items) != self.count):
            parser.error(f"argument {option_string}: expected {self.count or 'one or more'} values, "
                         f"comma-separated, got {len(items)}")
        setattr(namespace, self.dest, items)

    def _parse(self, parser, option_string, piece: str):
        try:
            return self.item(piece)
        except ValueError as e:  # int('x') says "invalid literal for int() with base 10": say it plainly
            parser.error(f"argument {option_string}: " + (f"invalid {self.item.__name__} value: {piece!r}"
                                                         if self.item in (int, float) else str(e)))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, where it has one to show (a list as it is typed)."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if "(default" in text or default is None or default is False or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {format_default(default)})"

    def _format_args(self, action, default_metavar):
        if isinstance(action, ListOption):  # its metavar shows the syntax: N,N,...
            return action.metavar
        return super()._format_args(action, default_metavar)


def format_default(value) -> str:
    """A default as a user would type it; '%' doubled, since argparse %-formats help strings."""
    if isinstance(value, (list, tuple)):
        text = ",".join(map(str, value))
    else:
        text = str(value) if value != "" else '""'
    return text.replace("%", "%%")
