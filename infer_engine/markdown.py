# Text shown as itself in Markdown: a model's name and source on the page (infer_engine/ui.py), an assistant's
# name on its model card and evaluation report (training/publish.py, training/evaluate.py). Library only.
"""Markdown escaping for names and sources that come from users or from a model's own files."""

from __future__ import annotations

import re


def markdown_text(text: str) -> str:
    """``text`` shown as itself in Markdown: no link, image, emphasis, heading or HTML can be made of it.

    Args:
        text: e.g. a model's name or source.
    """
    inline = re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", text)  # emphasis, code, links, images, HTML, tables
    return re.sub(r"^(\d+(?=[.)])|(?=[#>+=-]))", r"\1\\", inline)  # a list, quote or heading at the start
