"""Corpus discovery and reading: text files, directories, globs, jsonl, Hugging Face datasets, and
the embedded default corpus (the Python standard library's own sources and pydoc topics).

Everything is read lazily, so a corpus larger than memory streams through. Text is read as UTF-8
with errors="replace"; CRLF and CR-only line endings become LF and a leading UTF-8 BOM is dropped.

A *document* is one text file, one jsonl record, one dataset row, one standard-library module or
one pydoc topic. `Corpus.blocks` cuts documents into blocks of at most `block_chars` characters (at
a line break when one exists): blocks are the unit of the train/validation split.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# suffixes read as text without sniffing, and suffixes never read when walking a directory
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .py .pyi .c .h .cc .cpp .hpp .java .js .ts .go .rs .sh .tex .html .htm .xml "
    ".csv .tsv .json .yaml .yml .toml .ini .cfg".split()
)
BINARY_SUFFIXES = frozenset(
    ".bin .npy .npz .pt .pth .ckpt .safetensors .pkl .pickle .gz .bz2 .xz .zst .zip .tar .7z .png .jpg "
    ".jpeg .gif .bmp .webp .ico .pdf .so .dll .dylib .o .a .pyc .pyo .whl .exe .class .jar .mp3 .mp4 .wav "
    ".ogg .flac .ttf .otf .woff .woff2 .db .sqlite .parquet .arrow .lock".split()
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
GLOB_CHARS = re.compile(r"[*?\[]")
HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.\[\]:%-]+)?$")
READ_CHARS = 1 << 16  # characters read from a file at a time


def normalize_text(text: str) -> str:
    """CRLF and lone CR -> LF; drop a leading UTF-8 byte-order mark."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_text_file(path: str | Path) -> str:
    """A whole text file, decoded and normalised as the corpus reader does."""
    return "".join(_read_chunks(Path(path)))


def _read_chunks(path: Path) -> Iterator[str]:
    # utf-8-sig drops a leading BOM; newline=None turns CRLF and CR into LF, even across chunks
    with open(path, encoding="utf-8-sig", errors="replace", newline=None) as f:
        while chunk := f.read(READ_CHARS):
            yield chunk


def looks_like_text(path: Path, sniff_bytes: int = 8192) -> bool:
    """True for a file whose first bytes hold no NUL and are (almost all) valid UTF-8."""
    suffix = path.suffix.lower()
    if suffix in BINARY_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(sniff_bytes)
    except OSError:
        return False
    if b"\0" in head:
        return False
    if suffix in TEXT_SUFFIXES or not head:
        return True
    decoded = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    return decoded.count("\ufffd") <= max(1, len(decoded) // 100)


# ---------------------------------------------------------------- sources


class Source:
    """One place text comes from. `documents()` yields each document as an iterable of string pieces
    (so a huge file need not be held whole); pieces are already decoded but not yet normalised."""

    def describe(self) -> str:
        raise NotImplementedError

    def documents(self) -> Iterator[Iterable[str]]:
        raise NotImplementedError


@dataclass
class TextFiles(Source):
    """Plain text files, each one document, in the given order."""

    paths: list[Path]
    label: str

    def describe(self) -> str:
        return f"{self.label} ({len(self.paths)} text file{'s' * (len(self.paths) != 1)})"

    def documents(self) -> Iterator[Iterable[str]]:
        for path in self.paths:
            yield _read_chunks(path)


@dataclass
class JsonlFile(Source):
    """A jsonl file: one document per record, taken from the string field `field`."""

    path: Path
    field: str = "text"

    def describe(self) -> str:
        return f"{self.path} (jsonl field {self.field!r})"

    def documents(self) -> Iterator[Iterable[str]]:
        with open(self.path, encoding="utf-8-sig", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path} line {line_no} is not valid JSON ({err.msg}); "
                                     "a jsonl file needs one JSON object per line") from None
                if not isinstance(record, dict) or self.field not in record:
                    fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{self.path} line {line_no} has no field {self.field!r} (it has: "
                                     f"{fields}); choose the text field with --jsonl-field")
                value = record[self.field]
                if not isinstance(value, str):
                    raise ValueError(f"{self.path} line {line_no}: field {self.field!r} is "
                                     f"{type(value).__name__}, not a string; choose a text field with --jsonl-field")
                yield (value,)


@dataclass
class HFDataset(Source):
    """A Hugging Face dataset, streamed (`datasets` is imported only here, and needs the network)."""

    name: str
    config: str | None = None
    split: str = "train"
    field: str = "text"
    implicit: bool = False  # named without `hf:`: also not a local path

    @classmethod
    def parse(cls, spec: str, field: str = "text", implicit: bool = False) -> HFDataset:
        """`NAME[:CONFIG][@SPLIT]`, e.g. `wikitext:wikitext-103-raw-v1@train`."""
        spec = spec.removeprefix("hf:")
        spec, _, split = spec.partition("@")
        name, _, config = spec.partition(":")
        return cls(name, config or None, split or "train", field, implicit)

    def describe(self) -> str:
        config = f":{self.config}" if self.config else ""
        return f"hf:{self.name}{config}@{self.split} (field {self.field!r})"

    def _what(self) -> str:
        what = f"loading the Hugging Face dataset {self.name!r}"
        if self.implicit:
            what = f"{self.name!r}: no such local file or directory, so it was taken as a Hugging Face dataset, and loading it"
        return what

    def documents(self) -> Iterator[Iterable[str]]:
        try:
            import datasets
        except ImportError:
            raise RuntimeError(f"{self._what()} needs the `datasets` package: pip install datasets "
                               "(or pass local text files instead)") from None
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
                os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
            raise RuntimeError(f"{self._what()} needs the network, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE "
                               "is set; go online or pass local text files")
        try:
            rows = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as err:  # network, unknown name, bad config: all end the same way
            raise RuntimeError(f"{self._what()} failed: {err} (check the name, the config and the network, "
                               "or pass local files)") from None
        for row_no, row in enumerate(rows):
            if self.field not in row:
                raise ValueError(f"dataset {self.name!r} row {row_no} has no field {self.field!r} (it has: "
                                 f"{', '.join(map(str, row))}); choose the text field with --jsonl-field")
            yield (str(row[self.field]),)


@dataclass
class PydocTopics(Source):
    """The `pydoc_data.topics` help texts, one document per topic, sorted by topic name."""

    def describe(self) -> str:
        return "pydoc_data.topics"

    def documents(self) -> Iterator[Iterable[str]]:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip it
            return
        for name in sorted(topics):
            yield (topics[name],)


# ---------------------------------------------------------------- resolving arguments


def _walk_text_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Text-like files and jsonl files under `root`, recursively, sorted; hidden entries skipped."""
    texts: list[Path] = []
    jsonls: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() in JSONL_SUFFIXES:
                jsonls.append(path)
            elif looks_like_text(path):
                texts.append(path)
    return texts, jsonls


def _file_source(path: Path, field: str, label: str | None = None) -> Source:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return JsonlFile(path, field)
    if not looks_like_text(path):
        raise ValueError(f"{path} does not look like a text file (binary content); pass text, jsonl "
                         "or a directory of them")
    return TextFiles([path], label or str(path))


def resolve_sources(specs: Iterable[str], jsonl_field: str = "text") -> list[Source]:
    """Turn command-line DATA arguments into sources.

    Each spec is a file (`.jsonl` / `.ndjson` read as jsonl, anything else as text), a directory
    (walked recursively for text-like and jsonl files), a glob pattern (`data/**/*.txt`), or a
    Hugging Face dataset `hf:NAME[:CONFIG][@SPLIT]` (the `hf:` prefix may be left off for a name that
    is not a local path).
    """
    sources: list[Source] = []
    for spec in specs:
        spec = str(spec)
        path = Path(spec).expanduser()
        if spec.startswith("hf:"):
            sources.append(HFDataset.parse(spec, jsonl_field))
        elif path.is_dir():
            texts, jsonls = _walk_text_files(path)
            if not texts and not jsonls:
                raise ValueError(f"directory {spec} contains no text files; point at a directory of "
                                 ".txt/.md/.py/... or .jsonl files")
            if texts:
                sources.append(TextFiles(texts, spec))
            sources.extend(JsonlFile(p, jsonl_field) for p in jsonls)
        elif path.is_file():
            sources.append(_file_source(path, jsonl_field))
        elif GLOB_CHARS.search(spec):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            files: list[Path] = []
            for match in map(Path, matches):
                if match.is_dir():
                    texts, jsonls = _walk_text_files(match)
                    files.extend(texts + jsonls)
                elif match.is_file():
                    files.append(match)
            texts = [f for f in files if f.suffix.lower() not in JSONL_SUFFIXES and looks_like_text(f)]
            jsonls = [f for f in files if f.suffix.lower() in JSONL_SUFFIXES]
            if not texts and not jsonls:
                raise ValueError(f"the pattern {spec!r} matches no text files; check the pattern "
                                 "(quote it so the shell does not expand it)")
            if texts:
                sources.append(TextFiles(texts, spec))
            sources.extend(JsonlFile(p, jsonl_field) for p in jsonls)
        elif HF_NAME.match(spec) and path.suffix.lower() not in TEXT_SUFFIXES | JSONL_SUFFIXES:
            sources.append(HFDataset.parse(spec, jsonl_field, implicit=True))
        else:
            raise FileNotFoundError(f"no such file or directory: {spec} (for a Hugging Face dataset write "
                                    "hf:NAME)")
    return sources


# ---------------------------------------------------------------- the embedded default corpus

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def default_corpus_files() -> list[Path]:
    """The standard library's `.py` sources, sorted by path relative to the stdlib directory.

    Found at run time with `sysconfig.get_paths()["stdlib"]`. Excluded: `site-packages` /
    `dist-packages` (not part of Python itself) and the test suites (`test`, `tests`,
    `idle_test` directories), which contain deliberately malformed files and are stripped by
    some distributions, so leaving them out keeps the corpus the same across installations.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # never walk site-packages
        rel = Path(dirpath).relative_to(root)
        files.extend((rel / name).as_posix() for name in filenames if name.endswith(".py"))
    return [root / rel for rel in sorted(files)]


def default_corpus(max_bytes: int | None = None) -> Corpus:
    """The corpus used when no data is given: stdlib `.py` sources, then the pydoc topics.

    `max_bytes` keeps only the first `max_bytes` bytes of UTF-8 text (in this fixed order).
    """
    files = default_corpus_files()
    if not files:
        raise FileNotFoundError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}; "
                                "pass your own text files to prepare")
    sources: list[Source] = [TextFiles(files, "python-stdlib"), PydocTopics()]
    return Corpus(sources, max_bytes=max_bytes, default=True)


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Block:
    """A piece of one document, at most `block_chars` characters of normalised text."""

    text: str
    doc_index: int  # which document (0-based, in corpus order)
    doc_end: bool  # True for the document's last block


@dataclass
class Corpus:
    """An ordered list of sources, read lazily; iterate it as many times as needed."""

    sources: list[Source]
    max_bytes: int | None = None
    default: bool = False

    @classmethod
    def from_args(cls, data: Iterable[str] | None, jsonl_field: str = "text",
                  max_bytes: int | None = None) -> Corpus:
        """Sources from command-line arguments, or the embedded default corpus when `data` is empty."""
        data = list(data or [])
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if not data:
            return default_corpus(max_bytes)
        return cls(resolve_sources(data, jsonl_field), max_bytes=max_bytes)

    def describe(self) -> str:
        parts = "; ".join(s.describe() for s in self.sources)
        if self.default:
            parts = f"embedded default corpus: {parts}"
        if self.max_bytes is not None:
            parts += f"; first {self.max_bytes} bytes"
        return parts

    def blocks(self, block_chars: int = 16384) -> Iterator[Block]:
        """Non-empty blocks of normalised text, in corpus order, stopping at `max_bytes`."""
        if block_chars < 1:
            raise ValueError(f"block_chars must be positive, got {block_chars}")
        budget = self.max_bytes
        doc_index = 0
        for source in self.sources:
            for pieces in source.documents():
                previous: str | None = None
                for text in _split_blocks(_normalized(pieces), block_chars):
                    if budget is not None:
                        size = len(text.encode("utf-8"))
                        if size >= budget:  # the last block of the corpus
                            text = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
                            if previous is not None:
                                yield Block(previous, doc_index, not text)
                            if text:
                                yield Block(text, doc_index, True)
                            return
                        budget -= size
                    if previous is not None:
                        yield Block(previous, doc_index, False)
                    previous = text
                if previous is not None:
                    yield Block(previous, doc_index, True)
                    doc_index += 1

    def documents(self) -> Iterator[str]:
        """Whole documents as strings (each held in memory: for small corpora and tests)."""
        parts: list[str] = []
        for block in self.blocks():
            parts.append(block.text)
            if block.doc_end:
                yield "".join(parts)
                parts = []

    def texts(self, block_chars: int = 16384) -> Iterator[str]:
        """Block texts only: what a tokenizer trainer wants."""
        return (block.text for block in self.blocks(block_chars))


def _normalized(pieces: Iterable[str]) -> Iterator[str]:
    """Normalise a stream of pieces of one document, a CR at a piece's end included."""
    first = True
    pending_cr = False
    for piece in pieces:
        if not piece:
            continue
        if first and piece.startswith("\ufeff"):
            piece = piece[1:]
        first = False
        if pending_cr and piece.startswith("\n"):
            piece = piece[1:]  # the LF of a CRLF split across pieces
        pending_cr = piece.endswith("\r")
        yield normalize_text(piece)


def _split_blocks(pieces: Iterable[str], block_chars: int) -> Iterator[str]:
    """Cut a stream of text into blocks of at most `block_chars`, after a newline when possible."""
    buffer = ""
    for piece in pieces:
        buffer += piece
        while len(buffer) >= block_chars:
            cut = buffer.rfind("\n", 0, block_chars) + 1
            if cut <= 0:
                cut = block_chars
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer
