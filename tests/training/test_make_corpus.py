# Tests for training/make_corpus.py: cleaning, chunking, skipped files, errors and the CLI.
# Run: .venv-train/bin/python -m pytest tests/training/test_make_corpus.py -q
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.make_corpus import (
    MIN_CHUNK_CHARS,
    CorpusError,
    build_corpus,
    check_corpus,
    chunk_text,
    clean_markdown,
    clean_text,
    corpus_files,
    list_corpus,
    read_corpus_file,
)

REPO = Path(__file__).resolve().parents[2]


def _squash(text: str) -> str:
    return "".join(text.split())


def test_clean_text_normalises_whitespace_and_drops_control_characters() -> None:
    raw = "\ufeffHello\x00  world\x07\r\n\r\n\r\n\r\n第二段\u3000有\t空白\u200b。  \rlast line   \n\n"
    assert clean_text(raw) == "Hello world\n\n第二段 有 空白。\nlast line"


def test_clean_text_composes_unicode() -> None:
    assert clean_text("cafe\u0301") == "caf\u00e9"


def test_clean_markdown_keeps_the_text_and_drops_the_syntax() -> None:
    md = "\n".join(
        [
            "---",
            "title: Notes",
            "---",
            "# 书生·浦语 *简介*",
            "",
            "Read the **docs** at [the site](https://example.org) ![logo](logo.png) and `pip install x`.",
            "<!-- hidden note -->",
            "> quoted <b>bold</b> line",
            "",
            "***",
            "| a | b |",
            "|---|:---:|",
            "| 1 | 2 |",
            "```python",
            "print('kept')",
            "```",
            "[ref]: https://example.org/ref",
            "- a list item with __strong__ text",
        ]
    )
    cleaned = clean_text(md, markdown=True)
    assert cleaned.splitlines() == [
        "书生·浦语 简介",
        "",
        "Read the docs at the site logo and pip install x.",
        "quoted bold line",
        "",
        "| a | b |",
        "| 1 | 2 |",
        "print('kept')",
        "- a list item with strong text",
    ]
    assert "title" not in clean_markdown(md)
    hugo = "+++\ntitle = 'Notes'\ndate = 2024-01-01\n+++\nBody text.\n\n+++ not front matter\n"
    assert clean_markdown(hugo) == "Body text.\n\n+++ not front matter\n"


def test_txt_files_keep_markdown_like_characters() -> None:
    text = "a **literal** [x](y) *stays* 2*3*4"
    assert clean_text(text) == text


def test_chunks_pack_paragraphs_and_respect_the_limit() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * (3 + 2 * i) for i in range(12)]
    text = clean_text("\n\n".join(paragraphs))
    chunks = chunk_text(text, chunk_chars=200)
    assert all(len(c) <= 200 for c in chunks)
    assert _squash("".join(chunks)) == _squash(text)  # nothing lost, nothing added
    assert len(chunks) < len(paragraphs)  # short paragraphs share a chunk
    assert chunks[0].startswith("Paragraph 0.") and "\n\n" in chunks[0]


def test_long_paragraphs_split_at_sentence_ends() -> None:
    zh = "".join(f"这是第{i}句话，内容是关于增量预训练的示例。" for i in range(30))
    en = " ".join(f"Sentence number {i} talks about continued pre-training." for i in range(30))
    for text in (zh, en):
        chunks = chunk_text(text, chunk_chars=120)
        assert all(len(c) <= 120 for c in chunks)
        assert _squash("".join(chunks)) == _squash(text)
        assert all(c[-1] in "。." for c in chunks), chunks


def test_a_long_paragraph_keeps_its_spaces() -> None:  # each chunk is the user's text as written
    text = clean_text("First sentence here. Second one! 第三句。Fourth? 第五句. End\n" * 300)
    chunks = chunk_text(text, chunk_chars=500)
    assert len(chunks) > 1 and all(len(c) <= 500 and c in text for c in chunks)
    assert "Second one! 第三句。Fourth? 第五句. End\nFirst" in chunks[0]
    assert _squash("".join(chunks)) == _squash(text)


def test_a_sentence_longer_than_a_chunk_is_cut_hard() -> None:
    text = "x" * 250
    assert chunk_text(text, chunk_chars=100) == ["x" * 100, "x" * 100, "x" * 50]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("第一篇文章。\n\n第二段内容。", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# Title\n\nSome **bold** notes.", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    (root / "blank.md").write_text(" \n\t\n", encoding="utf-8")
    (root / "only_syntax.md").write_text("---\n***\n```\n```\n", encoding="utf-8")
    (root / "gbk.txt").write_bytes("中文内容".encode("gbk"))
    (root / "notepad.txt").write_bytes("记事本的文字。".encode("utf-16"))  # Windows Notepad's "Unicode"
    (root / "archive.txt").write_bytes(b"notes.txt\x00\x00\x00\x000000644\x00" * 40)  # a tar, valid UTF-8
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden.txt").write_text("secret", encoding="utf-8")
    return root


def test_build_corpus_reports_empty_and_bad_files(corpus: Path) -> None:
    report = build_corpus(corpus, chunk_chars=500)
    assert report.chunks == ["第一篇文章。\n\n第二段内容。", "记事本的文字。", "Title\n\nSome bold notes."]
    assert [p.name for p in report.used] == ["a.txt", "notepad.txt", "b.md"]
    skipped = {p.name: why for p, why in report.skipped}
    assert skipped["empty.txt"] == "empty file"
    assert skipped["blank.md"] == "empty file"
    assert skipped["only_syntax.md"] == "empty after cleaning"
    assert skipped["gbk.txt"].startswith("not UTF-8")
    assert skipped["archive.txt"] == "not text (24% control characters)"
    assert [p.name for p in report.ignored] == ["image.png"]


def test_corpus_files_are_the_files_build_corpus_reads(corpus: Path) -> None:
    (corpus / ".git").mkdir()
    (corpus / ".git" / "notes.md").write_text("hidden dir", encoding="utf-8")
    (corpus / "UPPER.TXT").write_text("Upper-case suffixes count too.", encoding="utf-8")
    files = corpus_files(corpus)
    assert [p.relative_to(corpus).as_posix() for p in files] == [
        "UPPER.TXT", "a.txt", "archive.txt", "blank.md", "empty.txt", "gbk.txt", "notepad.txt",
        "only_syntax.md", "sub/b.md"]
    report = build_corpus(corpus, chunk_chars=500)
    assert sorted(report.used + [p for p, _ in report.skipped]) == files
    assert [p.name for p in report.ignored] == ["image.png"]


def test_links_in_the_corpus_are_followed_and_each_file_is_read_once(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "n.md").write_text("A note kept elsewhere.", encoding="utf-8")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("First text.", encoding="utf-8")
    (corpus / "linked_notes").symlink_to(notes)  # a notes folder linked in: read
    (corpus / "sub" / "loop").symlink_to(corpus)  # a link loop: each directory is walked once
    (corpus / "z_sub").symlink_to(corpus / "sub")  # a folder seen twice: listed under its first name
    (corpus / "sub" / "s.txt").write_text("Sub text.", encoding="utf-8")
    (corpus / "z_same.txt").symlink_to(corpus / "a.txt")  # second names of a.txt: its text would count twice
    (corpus / "z_hard.txt").hardlink_to(corpus / "a.txt")
    (corpus / "gone.md").symlink_to(tmp_path / "deleted.md")  # a broken link is named, not silently passed
    os.mkfifo(tmp_path / "pipe")
    (corpus / "pipe.txt").symlink_to(tmp_path / "pipe")  # never opened: reading a pipe waits for a writer
    os.mkfifo(corpus / "fifo.txt")
    listing = list_corpus(corpus)
    assert [p.relative_to(corpus).as_posix() for p in listing.files] == ["a.txt", "linked_notes/n.md",
                                                                          "sub/s.txt"]
    assert {p.name: why for p, why in listing.unusable} == {
        "gone.md": f"broken symlink to {tmp_path / 'deleted.md'}", "pipe.txt": "not a regular file",
        "fifo.txt": "not a regular file",
        "z_hard.txt": "same file as a.txt", "z_same.txt": "same file as a.txt"}
    report = build_corpus(corpus)
    assert report.chunks == ["First text.", "A note kept elsewhere.", "Sub text."]
    assert report.skipped == listing.unusable
    with pytest.raises(CorpusError, match=r"no usable text .*gone\.md: broken symlink to"):
        check_corpus(_only(corpus / "gone.md", tmp_path / "only_broken"))


def _only(link: Path, directory: Path) -> Path:
    directory.mkdir()
    (directory / link.name).symlink_to(link.readlink())
    return directory


def test_an_unreadable_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("Some text.", encoding="utf-8")
    locked = tmp_path / "locked"
    locked.mkdir()
    iterdir = Path.iterdir

    def denied(self: Path):  # chmod 0 does not stop root, who runs CI: the OS's refusal, made here
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    report = build_corpus(tmp_path)
    assert report.used == [tmp_path / "a.txt"]
    assert report.skipped == [(locked, "directory not readable: Permission denied")]


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "latin1.md").write_bytes("café".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"no usable text .*empty\.txt: empty file.*latin1\.md: not UTF-8"):
        build_corpus(tmp_path)
    with pytest.raises(CorpusError, match=r"no usable text .*empty\.txt: empty file.*latin1\.md: not UTF-8"):
        check_corpus(tmp_path)  # the run's early check says the same
    # A Western European file gets a hint that fits it, not only the Chinese legacy encoding.
    with pytest.raises(CorpusError, match="iconv -f WINDOWS-1252 -t UTF-8"):
        read_corpus_file(tmp_path / "latin1.md")
    with pytest.raises(CorpusError, match="no .txt or .md files"):
        build_corpus(_empty_dir(tmp_path))


def _empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "nothing"
    path.mkdir()
    return path


def test_bad_arguments_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        build_corpus(tmp_path / "missing")
    with pytest.raises(CorpusError, match=f"at least {MIN_CHUNK_CHARS}"):
        build_corpus(tmp_path, chunk_chars=10)
    assert issubclass(CorpusError, ValueError)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.make_corpus", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_text_rows_and_warns(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "corpus.json"
    proc = _run_cli("--corpus", str(corpus), "--out", str(out), "--chunk-chars", "500")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == [
        {"text": "第一篇文章。\n\n第二段内容。"},
        {"text": "记事本的文字。"},
        {"text": "Title\n\nSome bold notes."},
    ]
    # All on stdout, which the pipeline shows: what was read and what was not.
    assert "gbk.txt: not UTF-8" in proc.stdout and "empty.txt: empty file" in proc.stdout
    assert "3 chunks" in proc.stdout and "5 skipped" in proc.stdout


def test_cli_fails_clearly_on_an_empty_corpus(tmp_path: Path) -> None:
    out = tmp_path / "corpus.json"
    proc = _run_cli("--corpus", str(_empty_dir(tmp_path)), "--out", str(out))
    assert proc.returncode == 2
    assert "no usable text" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_check_corpus_passes_a_corpus_with_one_usable_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("笔记".encode("gb18030"))
    (tmp_path / "b.txt").write_text("Some text.", encoding="utf-8")
    check_corpus(tmp_path)  # no error: b.txt is enough to pre-train on, as build_corpus finds
    assert [p.name for p in build_corpus(tmp_path).used] == ["b.txt"]
