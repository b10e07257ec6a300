# Continued-pre-training corpus: a directory of .txt/.md files -> [{"text": ...}] chunks for XTuner's
# pretrain_map_fn. Run from the repo root:
#   python -m training.make_corpus --corpus my_notes/ --out work/corpus.json [--chunk-chars 2000]
# Files are walked recursively (symlinked folders too) in sorted order, each file once, and must be UTF-8.
# Text is cleaned (Unicode NFC, control characters dropped, whitespace normalised; in .md files front matter,
# HTML, link/image syntax, emphasis and heading marks are reduced to their text) and packed into chunks of
# whole paragraphs, splitting long paragraphs at sentence ends. Empty, undecodable and unreadable files,
# broken symlinks and second links to one file are skipped and reported (stdout and the returned report),
# never fatal; a corpus that yields no text at all is an error.
from __future__ import annotations

import argparse
import codecs
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from training.atomic_io import write_json_atomic

SUFFIXES = (".txt", ".md")
CHUNK_CHARS = 2000
MIN_CHUNK_CHARS = 100
MAX_CONTROL_SHARE = 0.05  # more control characters than this (NULs of an archive, a binary): not text

_DROP = "\x00"  # marks removed syntax lines; clean_text has already taken control characters out
# YAML (Jekyll, most static sites) or TOML (Hugo) front matter: metadata, not the author's text.
_FRONT_MATTER = re.compile(r"\A(---|\+\+\+)\n.*?\n\1$", re.S | re.M)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# Line patterns use [ \t] rather than \s, which would run across newlines and eat the blank line before.
_FENCE = re.compile(r"^[ \t]*(```|~~~).*$", re.M)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_REF_DEF = re.compile(r"^[ \t]*\[[^\]]+\]:[ \t]+\S+.*$", re.M)
_HTML_TAG = re.compile(r"</?[A-Za-z][^>\n]*>")
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+", re.M)
_QUOTE = re.compile(r"^[ \t]{0,3}>[ \t]?", re.M)
_RULE = re.compile(r"^[ \t]*([-*_])([ \t]*\1){2,}[ \t]*$", re.M)
_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$", re.M)
_EMPHASIS = re.compile(r"(\*\*|__|~~)(?=\S)(.+?)(?<=\S)\1")
_ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])")  # not 2*3*4
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# Sentence ends: CJK full stops need no following space; Latin ones do (so "3.14" and "e.g." stay whole). The
# split keeps the space (or line end) with the next sentence, so sentences joined give the text back.
_SENTENCE_END = re.compile(r"(?<=[。！？；…])|(?<=[.!?;])(?=\s)")


class CorpusError(ValueError):
    """The corpus directory cannot be turned into training text."""


@dataclass
class CorpusReport:
    """What build_corpus read and skipped.

    Args:
        chunks: the cleaned text chunks, in file order.
        used: files that contributed text.
        skipped: (path, reason) for every .txt/.md file that gave no text, and list_corpus's unusable paths.
        ignored: files without a .txt/.md suffix.
    """

    chunks: list[str] = field(default_factory=list)
    used: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def clean_markdown(text: str) -> str:
    """Reduce Markdown syntax to its readable text (code inside fences is kept, the fences are not).

    Args:
        text: Markdown source with "\\n" line ends and no control characters.
    """
    # Syntax-only lines are replaced by a marker and then deleted, so they leave no blank line behind
    # (a blank line would split one paragraph in two when chunking).
    for pattern in (_FRONT_MATTER, _HTML_COMMENT, _FENCE, _REF_DEF, _TABLE_RULE, _RULE):
        text = pattern.sub(_DROP, text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _HTML_TAG.sub("", text)
    text = _HEADING.sub("", text)
    text = _QUOTE.sub("", text)
    text = _EMPHASIS.sub(r"\2", text)
    text = _ITALIC.sub(r"\1", text)
    text = _INLINE_CODE.sub(r"\1", text)
    lines = [line.replace(_DROP, "") for line in text.split("\n")]
    kept = [new for new, old in zip(lines, text.split("\n"), strict=True) if new.strip() or _DROP not in old]
    return "\n".join(kept)


def clean_text(text: str, markdown: bool = False) -> str:
    """Normalise text for training: NFC, "\\n" line ends, no control characters, single spaces, at most one
    blank line between paragraphs.

    Args:
        text: decoded file content.
        markdown: also strip Markdown syntax (clean_markdown).
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    # Cc = control characters, Cf = invisible format characters (zero-width space, BOM...); keep \n and \t.
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf"))
    if markdown:
        text = clean_markdown(text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _split_long(paragraph: str, chunk_chars: int) -> list[str]:
    """Pieces of at most chunk_chars, cut at sentence ends where possible, else hard."""
    pieces: list[str] = []
    current = ""
    for sentence in filter(None, _SENTENCE_END.split(paragraph)):
        if len(current) + len(sentence) <= chunk_chars:
            current += sentence
            continue
        pieces.append(current)
        current = sentence.lstrip()  # a chunk starts at a word, not at the space before it
        if len(current) > chunk_chars:  # one sentence longer than a chunk: cut it (by index: a 50 MB line)
            cuts = range(0, len(current), chunk_chars)
            *whole, current = (current[i : i + chunk_chars] for i in cuts)
            pieces += whole
    return [p for p in [*pieces, current] if p]


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Pack whole paragraphs into chunks of at most chunk_chars characters.

    Args:
        text: cleaned text, paragraphs separated by blank lines.
        chunk_chars: most characters per chunk.
    """
    chunks: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        for piece in _split_long(paragraph, chunk_chars) if len(paragraph) > chunk_chars else [paragraph]:
            if current and len(current) + 2 + len(piece) > chunk_chars:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    return [c for c in [*chunks, current] if c]


@dataclass
class CorpusListing:
    """What list_corpus found under a corpus directory.

    Args:
        files: the .txt/.md files to read (suffix in any case), sorted, each real file once.
        other: visible files without a .txt/.md suffix.
        folders: the folders walked, resolved (a linked folder by where it is).
        unusable: (path, reason) for broken symlinks, pipes and devices, unreadable directories and second
            names (symlinks, hard links) of a file already in files.
    """

    files: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    unusable: list[tuple[Path, str]] = field(default_factory=list)


def list_corpus(corpus_dir: Path) -> CorpusListing:
    """Walk corpus_dir recursively, leaving out hidden files and hidden directories, following symlinked
    directories (a linked notes folder is read; each directory once, so a link loop ends).

    Args:
        corpus_dir: an existing directory.
    """
    listing = CorpusListing()
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    pending = [corpus_dir]
    while pending:
        directory = pending.pop()
        stat = directory.stat()
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        listing.folders.append(directory.resolve())
        try:
            entries = sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
            folders = {entry for entry in entries if entry.is_dir()}  # is_dir raises EACCES of a folder above
        except OSError as err:
            listing.unusable.append((directory, f"directory not readable: {err.strerror or err}"))
            continue
        # Files, links and the odd pipe are listed by what they are below. Folders are walked in name order,
        # so one seen twice (a link to it) is always listed under its first name.
        found += [entry for entry in entries if entry not in folders]
        pending += reversed([entry for entry in entries if entry in folders])
    seen_files: dict[tuple[int, int], Path] = {}
    for path in sorted(found):
        try:
            _list_file(listing, seen_files, path, corpus_dir)
        except OSError as err:  # e.g. a folder that can be listed but not entered
            listing.unusable.append((path, f"unreadable: {err.strerror or err}"))
    listing.unusable.sort()
    return listing


def _list_file(listing: CorpusListing, seen: dict[tuple[int, int], Path], path: Path, corpus_dir: Path
               ) -> None:
    if path.suffix.lower() not in SUFFIXES:
        listing.other.append(path)
    elif not path.exists():
        listing.unusable.append((path, f"broken symlink to {os.readlink(path)}"))
    elif not path.is_file():  # a pipe or device (or a link to one): reading it could wait forever
        listing.unusable.append((path, "not a regular file"))
    else:
        stat = path.stat()
        first = seen.setdefault((stat.st_dev, stat.st_ino), path)
        if first == path:
            listing.files.append(path)
        else:  # read once: a linked copy would double its text in training
            listing.unusable.append((path, f"same file as {first.relative_to(corpus_dir)}"))


def corpus_files(corpus_dir: Path) -> list[Path]:
    """The files build_corpus reads: list_corpus's files.

    Args:
        corpus_dir: an existing directory.
    """
    return list_corpus(corpus_dir).files


def decode_text(raw: bytes) -> str:
    """A text file's content: UTF-16 when it starts with a UTF-16 byte order mark (Windows Notepad's
    "Unicode"), else UTF-8 with or without one (raises UnicodeDecodeError).

    Args:
        raw: the file's bytes.
    """
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def build_corpus(corpus_dir: Path, chunk_chars: int = CHUNK_CHARS) -> CorpusReport:
    """Read, clean and chunk every .txt/.md file under corpus_dir.

    Args:
        corpus_dir: directory walked recursively (hidden files and directories are left out).
        chunk_chars: most characters per chunk (at least MIN_CHUNK_CHARS).
    """
    if chunk_chars < MIN_CHUNK_CHARS:
        raise CorpusError(f"chunk_chars must be at least {MIN_CHUNK_CHARS}, got {chunk_chars}")
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus directory {corpus_dir} does not exist or is not a directory")
    listing = list_corpus(corpus_dir)
    report = CorpusReport(skipped=list(listing.unusable), ignored=listing.other)
    for path in listing.files:
        try:
            cleaned = read_corpus_file(path)
        except CorpusError as err:
            report.skipped.append((path, str(err)))
            continue
        report.chunks.extend(chunk_text(cleaned, chunk_chars))
        report.used.append(path)
    if not report.chunks:
        raise _no_text(corpus_dir, report.skipped)
    return report


def read_corpus_file(path: Path) -> str:
    """One corpus file's cleaned text (raises CorpusError saying why it cannot be used).

    Args:
        path: a .txt or .md file (Markdown is cleaned as such).
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CorpusError(f"unreadable: {err.strerror or err}") from None
    try:
        text = decode_text(raw)
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"not UTF-8 (bad byte 0x{raw[err.start]:02x} at offset {err.start}); convert it, e.g. "
            "iconv -f GB18030 -t UTF-8 (Chinese) or iconv -f WINDOWS-1252 -t UTF-8 (Western European)"
        ) from None
    controls = sum(unicodedata.category(ch) == "Cc" and ch not in "\n\r\t" for ch in text)
    if controls > MAX_CONTROL_SHARE * len(text):
        raise CorpusError(f"not text ({controls / len(text):.0%} control characters)")
    cleaned = clean_text(text, markdown=path.suffix.lower() == ".md")
    if not cleaned:
        raise CorpusError("empty after cleaning" if raw.strip() else "empty file")
    return cleaned


def check_corpus(corpus_dir: Path, listing: CorpusListing | None = None) -> None:
    """Raise CorpusError, as build_corpus would, when no file of corpus_dir has usable text; reads files
    only up to the first usable one, so a run can check its corpus before any work.

    Args:
        corpus_dir: an existing directory.
        listing: list_corpus(corpus_dir), when the caller has it already (None: walked here).
    """
    listing = listing or list_corpus(corpus_dir)
    skipped = list(listing.unusable)
    for path in listing.files:
        try:
            read_corpus_file(path)
            return
        except CorpusError as err:
            skipped.append((path, str(err)))
    raise _no_text(corpus_dir, skipped)


def _no_text(corpus_dir: Path, skipped: list[tuple[Path, str]]) -> CorpusError:
    details = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "no .txt or .md files"
    return CorpusError(f"no usable text in {corpus_dir} ({details})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build a [{'text': ...}] pre-training corpus from .txt/.md files."
    )
    parser.add_argument("--corpus", required=True, type=Path, help="directory of .txt/.md files")
    parser.add_argument("--out", required=True, type=Path, help="output JSON file")
    parser.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS, help="most characters per chunk")
    args = parser.parse_args(argv)
    try:
        report = build_corpus(args.corpus, args.chunk_chars)
    except CorpusError as err:
        print(f"make_corpus: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # On stdout with the summary: the pipeline shows them (a run must not train on less text unseen).
    for path, why in report.skipped:
        print(f"warning: skipped {path}: {why}")
    if report.ignored:
        print(f"warning: ignored {len(report.ignored)} file(s) without a .txt/.md suffix")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, [{"text": chunk} for chunk in report.chunks])
    chars = sum(len(c) for c in report.chunks)
    print(
        f"{len(report.chunks)} chunks ({chars} characters) from {len(report.used)} file(s) -> {args.out}; "
        f"{len(report.skipped)} skipped"
    )


if __name__ == "__main__":
    main()
