"""A real engine that notes what each ``stream_chat`` was asked: tests read what the page and API sent."""

from __future__ import annotations

from typing import Any

from infer_engine.engine import ChatEngine
from infer_engine.settings import GenerationParams


class RecordingEngine:
    """The real engine, noting what each ``stream_chat`` was asked (to see what the page and API send).

    Args:
        engine: the engine that really answers.
    """

    def __init__(self, engine: ChatEngine) -> None:
        self.engine, self.name, self.settings = engine, engine.name, engine.settings
        self.max_concurrency = engine.max_concurrency
        self.asked: list[tuple[list[dict], GenerationParams]] = []

    def stream_chat(self, messages: Any, params: GenerationParams, session_id: str) -> Any:
        self.asked.append((list(messages), params))
        return self.engine.stream_chat(messages, params, session_id)

    def fit_prompt(self, messages: Any, params: GenerationParams) -> Any:
        return self.engine.fit_prompt(messages, params)

    def abort(self, session_id: str) -> None:
        self.engine.abort(session_id)

    def close(self) -> None:
        self.engine.close()
