"""Structured logs to stderr: one JSON object per line, with role, party and request id.

Call sites pass only metadata (ids, shapes, sizes, timings, error messages). Shares,
keys, seeds and plaintexts are never logged.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["Logger"]


class Logger:
    def __init__(self, component: str, *, stream: TextIO | None = None, **fields: Any) -> None:
        self.component = component
        self.fields = fields
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()

    def log(self, level: str, event: str, **fields: Any) -> None:
        rec = {"ts": round(time.time(), 3), "level": level, "component": self.component, **self.fields,
               "event": event, **fields}
        line = json.dumps(rec, default=str)
        with self._lock:
            print(line, file=self._stream, flush=True)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)
