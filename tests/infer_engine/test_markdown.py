# Markdown escaping of names and sources: .venv/bin/python -m pytest tests/infer_engine/test_markdown.py -q
from __future__ import annotations

from markdown_it import MarkdownIt

from infer_engine.markdown import markdown_text


def test_a_name_or_source_is_shown_as_text_not_markdown() -> None:
    # A name can come from a model's own training_meta.json: no link, image or markup may be made of it.
    hostile = "[x](http://evil.example) ![i](http://evil.example/i.png) *b* <b>x</b> `c` ~~s~~ _u_ <!-- h"
    html = MarkdownIt().render("# " + markdown_text(hostile))
    assert html == f"<h1>{hostile.replace('<', '&lt;').replace('>', '&gt;')}</h1>\n"
    assert markdown_text("Tavi Brennock") == "Tavi Brennock" and markdown_text("小明") == "小明"
