# Files written whole or not at all (temp file + rename): a crash or Ctrl-C never leaves half a JSON file that
# a later run would trust. Used by the data, evaluation and corpus tools; nothing to run on its own.
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text via a temp file + rename, so a crash never leaves a half-written file.

    Args:
        path: destination file; its directory must exist.
        text: the content.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON (UTF-8, readable, non-ASCII kept) atomically (see write_text_atomic).

    Args:
        path: destination file; its directory must exist.
        data: JSON-serialisable value.
    """
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
