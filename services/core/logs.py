"""JSON logs, one object per line, carrying the job id of the request or job being served."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time

from services.core.errors import shorten

job_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")


LOG_CHARS = 4000  # of a log line's message (a traceback, in "exc", is kept whole)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": shorten(record.getMessage(), LOG_CHARS),  # an echoed request value never floods the log
        }
        job_id = getattr(record, "job_id", "") or job_id_var.get()
        if job_id:
            out["job_id"] = job_id
        for key in ("service", "rpc", "code", "artifact_id"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "INFO", *, job_id: str = "") -> None:
    """Route the root logger to stderr as JSON. Idempotent."""
    if job_id:
        job_id_var.set(job_id)
    root = logging.getLogger()
    root.setLevel(os.environ.get("TUNERY_LOG_LEVEL", level).upper())
    for h in list(root.handlers):
        if getattr(h, "_tunery", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._tunery = True  # type: ignore[attr-defined]
    root.addHandler(handler)
