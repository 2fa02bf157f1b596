"""Corpus discovery and reading: text files, directories, globs, jsonl, Hugging Face datasets, and
the embedded corpora: `python-stdlib` (the default: the Python standard library's own sources and
pydoc topics) and `python-site-packages` (that, plus the `.py` sources of the installed
site-packages, deduplicated by content); see docs/data.md.

Everything is read lazily, so a corpus larger than memory streams through. Text is read as UTF-8;
invalid bytes become U+FFFD and are counted (`CorpusReport`); CRLF and CR-only line endings become
LF and a leading UTF-8 BOM is dropped. Files a directory walk leaves out (binary, unreadable) are
named in the report too, so `prepare` can say what it skipped.

A *document* is one text file, one jsonl record, one dataset row, one standard-library module or
one pydoc topic. `Corpus.blocks` cuts documents into blocks of at most `block_chars` characters (at
a line break when one exists): blocks are the unit of the train/validation split.
"""

from __future__ import annotations

import codecs
import errno
import glob
import hashlib
import json
import os
import platform
import re
import site
import stat
import sysconfig
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- what reading changed or skipped


@dataclass
class CorpusReport:
    """What reading a corpus changed or left out, filled in while it is resolved and read.

    non_utf8: file -> number of U+FFFD characters that replaced its invalid UTF-8 bytes.
    binary: files a directory walk or glob skipped as binary; unreadable: (file, reason) pairs it
    skipped because they could not be read (broken symbolic links, special files, errors).
    """

    non_utf8: dict[str, int] = field(default_factory=dict)
    binary: dict[str, None] = field(default_factory=dict)  # an ordered set
    unreadable: dict[str, str] = field(default_factory=dict)

    def notes(self, show: int = 3) -> list[str]:
        """One line per kind of change, naming the count and the first files."""
        lines = []
        if self.non_utf8:
            first = next(iter(self.non_utf8))
            one = len(self.non_utf8) == 1
            lines.append(f"{_count(len(self.non_utf8), 'file')} {'is' if one else 'are'} not valid UTF-8: "
                         f"{'its' if one else 'their'} invalid bytes were read as U+FFFD "
                         f"({_count(sum(self.non_utf8.values()), 'character')}; first: {first})")
        if self.binary:
            lines.append(f"skipped {_count(len(self.binary), 'binary file')}: {_first(list(self.binary), show)}")
        if self.unreadable:
            named = [f"{path} ({why})" for path, why in self.unreadable.items()]
            lines.append(f"skipped {_count(len(self.unreadable), 'unreadable file')}: {_first(named, show)}")
        return lines

    def as_dict(self, show: int = 20) -> dict[str, Any]:
        """For meta.json: counts and the first `show` names of each kind."""
        return {"non_utf8_files": len(self.non_utf8), "non_utf8_characters": sum(self.non_utf8.values()),
                "non_utf8_first": list(self.non_utf8)[:show],
                "binary_skipped": len(self.binary), "binary_first": list(self.binary)[:show],
                "unreadable_skipped": len(self.unreadable),
                "unreadable_first": [f"{p} ({why})" for p, why in list(self.unreadable.items())[:show]]}


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _first(names: list[str], show: int) -> str:
    more = f" and {len(names) - show:,} more" if len(names) > show else ""
    return ", ".join(names[:show]) + more


# A decode error handler that replaces like errors="replace" and counts the replacements, per thread.
_DECODE_STATE = threading.local()
_COUNTING_REPLACE = "memoryformer.count-replace"


def _count_replace(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    _DECODE_STATE.replaced = getattr(_DECODE_STATE, "replaced", 0) + 1
    return "\ufffd", err.end


codecs.register_error(_COUNTING_REPLACE, _count_replace)


def read_text_file(path: str | Path) -> str:
    """A whole text file, decoded and normalised as the corpus reader does."""
    return "".join(_normalized(_read_chunks(Path(path))))


def _read_chunks(path: Path, report: CorpusReport | None = None) -> Iterator[str]:
    """A file's text in pieces: UTF-8 (a leading BOM dropped), invalid bytes -> U+FFFD (counted in
    `report`); line endings are left to `_normalized`."""
    before = getattr(_DECODE_STATE, "replaced", 0)
    try:
        with open(path, encoding="utf-8-sig", errors=_COUNTING_REPLACE, newline="") as f:
            while chunk := f.read(READ_CHARS):
                yield chunk
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}; fix or remove the file") from None
    replaced = getattr(_DECODE_STATE, "replaced", 0) - before
    if replaced and report is not None:
        report.non_utf8[str(path)] = replaced


def classify_file(path: Path, sniff_bytes: int = 8192) -> tuple[str, str]:
    """("text", ""), ("binary", "") or ("unreadable", why) for a directory entry.

    Binary: a known binary suffix, a NUL byte in the first `sniff_bytes`, or (for a suffix not known
    as text) bytes that are neither mostly valid UTF-8 nor free of control characters; text in a
    legacy 8-bit encoding (Latin-1, ...) counts as text, read with U+FFFD and reported.
    """
    try:
        info = os.stat(path)
    except OSError as err:
        broken = os.path.islink(path)
        return "unreadable", "broken symbolic link" if broken and err.errno == errno.ENOENT else (err.strerror or str(err))
    if not stat.S_ISREG(info.st_mode):
        return "unreadable", "not a regular file"
    suffix = path.suffix.lower()
    if suffix in BINARY_SUFFIXES:
        return "binary", ""
    try:
        with open(path, "rb") as f:
            head = f.read(sniff_bytes)
    except OSError as err:
        return "unreadable", err.strerror or str(err)
    if b"\0" in head:
        return "binary", ""
    if suffix in TEXT_SUFFIXES or not head:
        return "text", ""
    decoded = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    if decoded.count("\ufffd") <= max(1, len(decoded) // 100):
        return "text", ""
    controls = sum(1 for b in head if b < 32 and b not in _TEXT_CONTROLS or b == 127)
    return ("text", "") if controls <= len(head) // 100 else ("binary", "")


_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\b\x1b")


def looks_like_text(path: Path, sniff_bytes: int = 8192) -> bool:
    """True for a regular, readable file that `classify_file` calls text."""
    return classify_file(path, sniff_bytes)[0] == "text"


# ---------------------------------------------------------------- sources


class Source:
    """One place text comes from. `documents()` yields each document as an iterable of string pieces
    (so a huge file need not be held whole); pieces are already decoded but not yet normalised."""

    def describe(self) -> str:
        raise NotImplementedError

    def documents(self) -> Iterator[Iterable[str]]:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any] | None:
        """What meta.json should record about this source beyond `describe()`, or None."""
        return None


@dataclass
class TextFiles(Source):
    """Plain text files, each one document, in the given order.

    `opened` counts the files begun so far (the corpus may stop early at max_bytes), so
    `files[:opened]` are the files whose text was read.
    """

    paths: list[Path]
    label: str
    report: CorpusReport | None = None
    opened: int = 0

    def describe(self) -> str:
        return f"{self.label} ({len(self.paths)} text file{'s' * (len(self.paths) != 1)})"

    def documents(self) -> Iterator[Iterable[str]]:
        for index, path in enumerate(self.paths):
            self.opened = max(self.opened, index + 1)
            yield _read_chunks(path, self.report)


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

    def size(self) -> int:
        """Characters in all topics (about their UTF-8 bytes)."""
        return sum(len(text) for text in self._topics().values())

    @staticmethod
    def _topics() -> dict[str, str]:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip it
            return {}
        return topics

    def documents(self) -> Iterator[Iterable[str]]:
        topics = self._topics()
        for name in sorted(topics):
            yield (topics[name],)


# ---------------------------------------------------------------- resolving arguments


def _walk_text_files(root: Path, report: CorpusReport) -> tuple[list[Path], list[Path]]:
    """Text-like files and jsonl files under `root`, recursively, sorted; hidden entries skipped
    silently, binary and unreadable files skipped and recorded in `report`."""
    texts: list[Path] = []
    jsonls: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if not name.startswith("."):
                _sort_file(Path(dirpath) / name, texts, jsonls, report)
    return texts, jsonls


def _sort_file(path: Path, texts: list[Path], jsonls: list[Path], report: CorpusReport) -> None:
    """Append `path` to texts or jsonls, or record why it is skipped."""
    kind, why = classify_file(path)
    if kind == "unreadable":
        report.unreadable[str(path)] = why
    elif path.suffix.lower() in JSONL_SUFFIXES:
        jsonls.append(path)
    elif kind == "text":
        texts.append(path)
    else:
        report.binary[str(path)] = None


def _file_source(path: Path, field: str, report: CorpusReport) -> Source:
    kind, why = classify_file(path)
    if kind == "unreadable":
        raise ValueError(f"cannot read {path}: {why}; pass a readable text file")
    if path.suffix.lower() in JSONL_SUFFIXES:
        return JsonlFile(path, field)
    if kind == "binary":
        raise ValueError(f"{path} does not look like a text file (binary content); pass text, jsonl "
                         "or a directory of them")
    return TextFiles([path], str(path), report)


def _tree_sources(spec: str, texts: list[Path], jsonls: list[Path], field: str,
                  report: CorpusReport) -> list[Source]:
    sources: list[Source] = [TextFiles(texts, spec, report)] if texts else []
    return sources + [JsonlFile(p, field) for p in jsonls]


def resolve_sources(specs: Iterable[str], jsonl_field: str = "text",
                    report: CorpusReport | None = None) -> list[Source]:
    """Turn command-line DATA arguments into sources.

    Each spec is a file (`.jsonl` / `.ndjson` read as jsonl, anything else as text), a directory
    (walked recursively for text-like and jsonl files), a glob pattern (`data/**/*.txt`), an
    embedded corpus `embedded:NAME` (see EMBEDDED_CORPORA), or a Hugging Face dataset
    `hf:NAME[:CONFIG][@SPLIT]` (the `hf:` prefix may be left off for a name that is not a local
    path). Skipped files and non-UTF-8 text are recorded in `report`.
    """
    report = CorpusReport() if report is None else report
    sources: list[Source] = []
    for spec in specs:
        sources.extend(_resolve_one(str(spec), jsonl_field, report))
    return sources


def _resolve_one(spec: str, jsonl_field: str, report: CorpusReport) -> list[Source]:
    path = Path(spec).expanduser()
    if spec.startswith("hf:"):
        return [HFDataset.parse(spec, jsonl_field)]
    if spec.startswith("embedded:"):
        return embedded_sources(spec.removeprefix("embedded:"), report)
    if path.is_dir():
        texts, jsonls = _walk_text_files(path, report)
        if not texts and not jsonls:
            raise ValueError(f"directory {spec} contains no text files; point at a directory of "
                             ".txt/.md/.py/... or .jsonl files")
        return _tree_sources(spec, texts, jsonls, jsonl_field, report)
    if path.exists():  # a file, or something else that exists (a FIFO, a device): say it cannot be read
        return [_file_source(path, jsonl_field, report)]
    if path.is_symlink():
        raise FileNotFoundError(f"{spec} is a broken symbolic link (to {os.readlink(path)}); pass an existing file")
    if GLOB_CHARS.search(spec):
        texts, jsonls = _glob_files(spec, report)
        if not texts and not jsonls:
            raise ValueError(f"the pattern {spec!r} matches no text files; check the pattern "
                             "(quote it so the shell does not expand it)")
        return _tree_sources(spec, texts, jsonls, jsonl_field, report)
    if HF_NAME.match(spec) and path.suffix.lower() not in TEXT_SUFFIXES | JSONL_SUFFIXES:
        return [HFDataset.parse(spec, jsonl_field, implicit=True)]
    raise FileNotFoundError(f"no such file or directory: {spec} (for a Hugging Face dataset write "
                            "hf:NAME)")


def _glob_files(spec: str, report: CorpusReport) -> tuple[list[Path], list[Path]]:
    """The text and jsonl files a glob pattern matches (directories among the matches walked)."""
    texts: list[Path] = []
    jsonls: list[Path] = []
    for match in map(Path, sorted(glob.glob(os.path.expanduser(spec), recursive=True))):
        if match.is_dir():
            more_texts, more_jsonls = _walk_text_files(match, report)
            texts += more_texts
            jsonls += more_jsonls
        else:
            _sort_file(match, texts, jsonls, report)
    return texts, jsonls


# ---------------------------------------------------------------- the embedded corpora

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
EMBEDDED_CORPORA = {
    "python-stdlib": "the standard library's .py sources and the pydoc topics (the default corpus)",
    "python-site-packages": "python-stdlib plus the .py sources of the installed site-packages, "
                            "deduplicated by content",
}


def _python_files(root: Path) -> list[Path]:
    """`.py` files under root, sorted by relative path; test suites, hidden and nested
    site-packages / dist-packages directories left out."""
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        files.extend((rel / name).as_posix() for name in filenames if name.endswith(".py"))
    return [root / rel for rel in sorted(files)]


def default_corpus_files() -> list[Path]:
    """The standard library's `.py` sources, sorted by path relative to the stdlib directory.

    Found at run time with `sysconfig.get_paths()["stdlib"]`. Excluded: `site-packages` /
    `dist-packages` (not part of Python itself) and the test suites (`test`, `tests`,
    `idle_test` directories), which contain deliberately malformed files and are stripped by
    some distributions, so leaving them out keeps the corpus the same across installations.
    """
    return _python_files(Path(sysconfig.get_paths()["stdlib"]))


def site_packages_dirs() -> list[Path]:
    """The installed site-packages directories: sysconfig's purelib and platlib, `site`'s global
    directories and the user directory when enabled; existing ones only, first occurrence kept."""
    candidates = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    candidates += list(getattr(site, "getsitepackages", list)())
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    dirs: dict[str, Path] = {}
    for candidate in candidates:
        path = Path(candidate)
        if path.is_dir():
            dirs.setdefault(os.path.realpath(path), path)
    return list(dirs.values())


@dataclass
class CodeFiles(TextFiles):
    """Python sources of one embedded corpus part: content-deduplicated files with their owners.

    labels: each file's name in the corpus ("python-stdlib/os.py", "site-packages/torch/nn/...");
    digests: sha256 of each file's bytes; owners: "name==version" of the distribution whose RECORD
    lists the file ("" when none does). meta.json records the list's hash and the owners read.
    """

    labels: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    duplicates: int = 0  # files left out because an earlier file had the same bytes
    roots: list[str] = field(default_factory=list)

    def files_sha256(self) -> str:
        """sha256 of the ordered file list: one "label<TAB>content sha256" line per file."""
        lines = "".join(f"{label}\t{digest}\n" for label, digest in zip(self.labels, self.digests))
        return hashlib.sha256(lines.encode()).hexdigest()

    def metadata(self) -> dict[str, Any]:
        read = self.owners[:self.opened]
        return {"part": self.label, "roots": self.roots, "files": len(self.paths),
                "files_sha256": self.files_sha256(), "duplicates_dropped": self.duplicates,
                "files_read": self.opened, "packages": sorted({o for o in read if o}, key=str.lower),
                "files_read_without_package": sum(1 for o in read if not o)}


def _distribution_owners(site_dir: Path) -> dict[str, str]:
    """Real path of each `.py` file listed in a RECORD under site_dir -> "name==version"."""
    from importlib import metadata

    owners: dict[str, str] = {}
    for dist in metadata.distributions(path=[str(site_dir)]):
        owner = f"{dist.metadata['Name']}=={dist.version}"
        for file in dist.files or ():
            if str(file).endswith(".py"):
                owners.setdefault(os.path.realpath(dist.locate_file(file)), owner)
    return owners


def _file_sha256(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
                else hashlib.sha256(f.read()).hexdigest()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}; fix or remove the file") from None


def code_files(label: str, roots: list[Path], report: CorpusReport, seen: set[str] | None = None, *,
               owners: bool = False, dedup: bool = True) -> CodeFiles:
    """The `.py` files under each root (roots in order, files sorted by relative path); with `dedup`,
    only the first of files with equal bytes (`seen` carries content hashes across parts)."""
    seen = set() if seen is None else seen
    part = CodeFiles([], label, report, roots=[str(r) for r in roots])
    for i, root in enumerate(roots):
        owner_of = _distribution_owners(root) if owners else {}
        prefix = label if len(roots) == 1 else f"{label}[{i}]"
        for path in _python_files(root):
            kind, why = classify_file(path)
            if kind != "text":
                if kind == "binary":
                    report.binary[str(path)] = None
                else:
                    report.unreadable[str(path)] = why
                continue
            digest = _file_sha256(path)
            if dedup and digest in seen:
                part.duplicates += 1
                continue
            seen.add(digest)
            part.paths.append(path)
            part.labels.append(f"{prefix}/{path.relative_to(root).as_posix()}")
            part.digests.append(digest)
            part.owners.append(owner_of.get(os.path.realpath(path), ""))
    return part


def embedded_sources(name: str, report: CorpusReport | None = None, *,
                     site_dirs: list[Path] | None = None, include_stdlib: bool = True) -> list[Source]:
    """The sources of an embedded corpus (EMBEDDED_CORPORA). `site_dirs` replaces the search path of
    site-packages (default `site_packages_dirs()`); `include_stdlib=False` leaves the standard
    library part out (both for tests)."""
    if name not in EMBEDDED_CORPORA:
        raise ValueError(f"unknown embedded corpus {name!r}; choose one of: {', '.join(EMBEDDED_CORPORA)}")
    report = CorpusReport() if report is None else report
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if name == "python-stdlib":  # kept as it always was: no deduplication
        part = code_files("python-stdlib", [stdlib], report, dedup=False)
        if not part.paths:
            raise FileNotFoundError(f"no Python sources found under {stdlib}; pass your own text files to prepare")
        return [part, PydocTopics()]
    seen: set[str] = set()
    sources: list[Source] = []
    if include_stdlib:
        sources += [code_files("python-stdlib", [stdlib], report, seen), PydocTopics()]
    roots = site_packages_dirs() if site_dirs is None else [Path(d) for d in site_dirs]
    part = code_files("python-site-packages", roots, report, seen, owners=True)
    if not part.paths:
        raise FileNotFoundError(f"no Python sources found in the site-packages ({', '.join(map(str, roots)) or 'none'})")
    return sources + [part]


def default_corpus(max_bytes: int | None = None) -> Corpus:
    """The corpus used when no data is given: stdlib `.py` sources, then the pydoc topics.

    `max_bytes` keeps only the first `max_bytes` bytes of UTF-8 text (in this fixed order).
    """
    report = CorpusReport()
    return Corpus(embedded_sources("python-stdlib", report), max_bytes=max_bytes, default=True, report=report)


def embedded_corpus(name: str, max_bytes: int | None = None, *, site_dirs: list[Path] | None = None,
                    include_stdlib: bool = True) -> Corpus:
    """An embedded corpus by name (see EMBEDDED_CORPORA and docs/data.md)."""
    report = CorpusReport()
    sources = embedded_sources(name, report, site_dirs=site_dirs, include_stdlib=include_stdlib)
    return Corpus(sources, max_bytes=max_bytes, report=report)


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
    report: CorpusReport = field(default_factory=CorpusReport)

    @classmethod
    def from_args(cls, data: Iterable[str] | None, jsonl_field: str = "text",
                  max_bytes: int | None = None) -> Corpus:
        """Sources from command-line arguments, or the embedded default corpus when `data` is empty."""
        data = list(data or [])
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if not data:
            return default_corpus(max_bytes)
        report = CorpusReport()
        return cls(resolve_sources(data, jsonl_field, report), max_bytes=max_bytes, report=report)

    def metadata(self) -> dict[str, Any] | None:
        """What meta.json records about the embedded parts (python version, file list hashes,
        packages read), or None for a corpus without them. Complete only after reading."""
        parts = [m for m in (s.metadata() for s in self.sources) if m is not None]
        return {"python": platform.python_version(), "parts": parts} if parts else None

    def size_hint(self) -> int | None:
        """Bytes of text to expect (file sizes, capped at max_bytes), or None when unknown."""
        total = 0
        for source in self.sources:
            if isinstance(source, PydocTopics):
                total += source.size()
                continue
            if not isinstance(source, TextFiles):
                return self.max_bytes
            total += sum(_file_size(p) for p in source.paths)
        return total if self.max_bytes is None else min(total, self.max_bytes)

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


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
