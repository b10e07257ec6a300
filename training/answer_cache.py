# Greedy answers kept on disk per model files and settings, so that a base model asked the same prompts by
# several runs (replay data, the evaluation's base side) is asked only once. Used by make_identity_data.py
# and evaluate.py; nothing to run on its own. Delete <repo>/.cache/answers to start over.
from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from training.atomic_io import write_json_atomic

DEFAULT_ANSWER_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "answers"


def model_key(model_dir: Path) -> list:
    """What a model dir's answers depend on: its resolved path and every file's name, size and mtime.

    Args:
        model_dir: a HF model dir.
    """
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return [str(model_dir.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def cached(path_for: Callable[[str], Path], key: object, compute: Callable[[], dict]) -> dict:
    """compute(), or its earlier result stored under a hash of `key` (JSON).

    Args:
        path_for: maps the key's hash to the cache file.
        key: everything the result depends on (JSON-serialisable).
        compute: makes the result (a JSON-serialisable dict).
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    path = path_for(digest[:24])
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    """Add --answer-cache DIR and --no-answer-cache to a CLI; read them back with cache_dir_from(args).

    Args:
        parser: the CLI's parser.
    """
    parser.add_argument("--answer-cache", type=Path, default=DEFAULT_ANSWER_CACHE,
                        help="where answers are cached per model files and settings")
    parser.add_argument("--no-answer-cache", action="store_true", help="always generate")


def cache_dir_from(args: argparse.Namespace) -> Path | None:
    """The answer cache dir the CLI asked for (None: always generate).

    Args:
        args: parsed arguments of a parser that add_cache_args extended.
    """
    return None if args.no_answer_cache else args.answer_cache
