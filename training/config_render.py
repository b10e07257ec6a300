# Rendering XTuner config templates: a per-run copy of a shipped config with its top-level settings replaced.
# Imported by training/stages.py; not run on its own.
"""Config rendering: literal overrides of a config's top-level assignments, located with `ast`."""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from pathlib import Path

from training.presets import REPO_ROOT, Preset


class ConfigRenderError(ValueError):
    """An override names no top-level setting of the config, or one assigned more than once."""


def top_level_assignments(source: str) -> dict[str, list[ast.stmt]]:
    """Top-level statements that bind each simple name (`x = ...`, `x += ...`, `x: T = ...`).

    Args:
        source: the config's Python source.
    """
    found: dict[str, list[ast.stmt]] = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
        for target in targets:
            if isinstance(target, ast.Name):
                found.setdefault(target.id, []).append(node)
    return found


def literal_settings(source: str) -> dict[str, object]:
    """The top-level settings of a config whose values are plain literals (for training_meta.json).

    Args:
        source: the config's Python source.
    """
    settings = {}
    for name, nodes in top_level_assignments(source).items():
        if len(nodes) == 1 and isinstance(nodes[0], ast.Assign):
            try:
                settings[name] = ast.literal_eval(nodes[0].value)
            except (ValueError, TypeError, SyntaxError):  # not a literal: an expression or object
                continue
    return settings


def render_config(source: str, overrides: Mapping[str, object], header: str = "") -> str:
    """Return `source` with the value of each overridden top-level setting replaced by the override's literal.

    Every override must match exactly one top-level assignment; values must be Python literals.

    Args:
        source: the config template's Python source.
        overrides: setting name -> new value (str, int, float, bool, None, or lists/tuples/dicts of them).
        header: comment lines put at the top of the rendered file (each starting with '#').
    """
    assignments = top_level_assignments(source)
    edits = []
    for name, value in overrides.items():
        nodes = assignments.get(name, [])
        if not nodes:
            known = ", ".join(sorted(n for n, v in assignments.items() if len(v) == 1))
            raise ConfigRenderError(f"override {name!r} matches no top-level setting; settings: {known}")
        if len(nodes) > 1 or not isinstance(nodes[0], ast.Assign):
            lines = ", ".join(str(n.lineno) for n in nodes)
            raise ConfigRenderError(f"override {name!r} is ambiguous: the config binds it on lines {lines}")
        text = repr(value)
        try:
            if ast.literal_eval(text) != value:
                raise ValueError
        except (ValueError, SyntaxError):
            raise ConfigRenderError(f"override {name!r}: {value!r} is not a plain literal") from None
        edits.append((nodes[0].value, text))
    data = source.encode()
    offsets = [0]  # byte offset of each line start (ast counts lines by "\n")
    for line in data.split(b"\n"):
        offsets.append(offsets[-1] + len(line) + 1)
    # Replace from the end so earlier byte offsets stay valid (ast columns are UTF-8 byte offsets).
    for node, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        data = data[:start] + text.encode() + data[end:]
    rendered = header + data.decode()
    ast.parse(rendered)
    return rendered


def template_settings(spec: Preset, stage: str) -> dict[str, object]:
    """The literal top-level settings of a preset's stage config before the run's own: its template's, with
    the preset's values applied. Everything that reads a template's settings reads them here.

    Raises ConfigRenderError when a preset value names no top-level setting of the template.

    Args:
        spec: the preset.
        stage: "sft" or "pretrain".
    """
    template, values = spec.stage_config(stage)
    return literal_settings(render_config(template.read_text(encoding="utf-8"), values))


def write_stage_config(spec: Preset, stage: str, overrides: Mapping[str, object], out: Path,
                       run_name: str) -> Path:
    """Render a preset's stage config into `out` (atomically): its template with the preset's values, then
    the run's `overrides`, applied; the header says what it is and which settings each of them replaced.

    Args:
        spec: the preset.
        stage: "sft" or "pretrain".
        overrides: top-level settings this run replaces (they win over the preset's values).
        out: the rendered file to write.
        run_name: the run, named in the header.
    """
    template, values = spec.stage_config(stage)
    replaced = [f"by preset {spec.name} (training/presets.py): {', '.join(values)}"] if values else []
    replaced.append(f"by this run: {', '.join(overrides)}")
    header = (f"# Rendered by training/pipeline.py for run {run_name!r} from "
              f"{template.relative_to(REPO_ROOT)}\n"
              f"# with these settings replaced: {'; then '.join(replaced)}. This file is what ran.\n")
    text = render_config(template.read_text(encoding="utf-8"), {**values, **overrides}, header)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
