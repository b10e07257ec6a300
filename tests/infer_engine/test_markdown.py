# Markdown escaping of names and sources: .venv/bin/python -m pytest tests/infer_engine/test_markdown.py -q
from __future__ import annotations

from markdown_it import MarkdownIt

from infer_engine.markdown import markdown_text


def test_a_name_or_source_is_shown_as_text_not_markdown() -> None:
    # A name can come from a model's own training_meta.json: no link, image or markup may be made of it.
    hostile = "[x](http://evil.example) ![i](http://evil.example/i.png) *b* <b>x</b> `c` ~~s~~ _u_ <!-- h"
    html = MarkdownIt().render("# " + markdown_text(hostile))
    assert html == f"<h1>{hostile.replace('<', '&lt;').replace('>', '&gt;')}</h1>\n"
    for plain in ("Tavi Brennock", "小明", "InternLM2.5-1.8B", "I'm Ada's assistant."):
        assert markdown_text(plain) == plain  # an ordinary name or sentence reads the same in the raw file
    for start in ("1. x", "# x", "- x", "> x"):  # no list, heading or quote made of it either
        assert MarkdownIt().render(markdown_text(start)) == f"<p>{start.replace('>', '&gt;')}</p>\n"
