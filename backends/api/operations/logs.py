"""The service's log lines as JSON, one object per line (`SDXL_LOG_FORMAT=json`), for a log
pipeline that reads fields instead of parsing text. The access log's fields (route template,
method, status, milliseconds) come as their own keys; like the text lines, they carry no
prompt, key, image or job id. A line logged inside a request carries its `trace_id` (BentoML gives
every request one, recorded or not)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from opentelemetry import trace

# Fields a log call may add (`extra=`) that a JSON line carries as its own keys.
FIELDS = ("route", "method", "status", "duration_ms")


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **{field: getattr(record, field) for field in FIELDS if hasattr(record, field)},
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:  # (inside a request: its trace, to find in the tracing backend when recorded)
            line["trace_id"] = f"{span.trace_id:032x}"
        if hasattr(record, "component"):  # (set by BentoML's filter on its handlers: "[sdxl:1]")
            line["component"] = record.component.strip("[]")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def log_json_lines() -> None:
    """Every handler BentoML set up in this process (the root logger's and BentoML's own) writes
    JSON lines from now on."""
    formatter = JsonLines()
    for logger in (logging.getLogger(), logging.getLogger("bentoml")):
        for handler in logger.handlers:
            handler.setFormatter(formatter)
