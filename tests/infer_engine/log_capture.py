"""What the engine logs, captured for tests (the ``engine_log`` fixture in conftest.py hands one out).

The backends log one line when a reply ends, from the thread that really ended it: a test reads that line to
see that a stopped reply stopped in the engine, not only on the consumer's side.
"""

from __future__ import annotations

import re
import time

import pytest


class EngineLog:
    """The engine's loguru messages, captured as they are logged (the backends log every reply's end)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def wait_for(self, pattern: str, timeout_s: float, after: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the messages logged from index ``after`` on, waiting at most
        ``timeout_s``; fails the test otherwise.

        Args:
            pattern: regular expression to find in one message.
            timeout_s: most seconds to wait.
            after: ignore messages before this index (``len(log.messages)`` taken before an action).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            for message in self.messages[after:]:
                if match := re.search(pattern, message):
                    return match
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern!r} not logged within {timeout_s}s; last: {self.messages[-5:]}")
            time.sleep(0.005)

    def reply_end(self, session_id: str, timeout_s: float, after: int = 0) -> tuple[str, int]:
        """How the transformers engine ended a reply of ``session_id``: (finish reason, new tokens).

        Args:
            session_id: the session whose reply to look for.
            timeout_s: most seconds to wait for it.
            after: ignore messages before this index.
        """
        pattern = rf"^session {re.escape(session_id)} request \d+: (\w+) \(\d+ prompt \+ (\d+) new tokens"
        match = self.wait_for(pattern, timeout_s, after)
        return match[1], int(match[2])
