"""Log lines: one per event, as text for people or as JSON for log collectors (`--log-format json`).

Events are lifecycle (serving, draining, stopped), sweeps that freed sessions and failures;
nothing is logged per token or per step at the default level, so a busy server's log stays
readable and costs nothing on the hot path. A traceback stays inside its event's JSON line.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
GRPC_LOGGER = "grpc._cython.cygrpc"
CALLER_GONE = "ExecuteBatchError raised in core"  # how grpc's record of it begins


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time (UTC, ISO 8601), level, logger, message, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Send the root logger's records to stderr at `level`, formatted as `log_format` ("text" or "json").

    Like `logging.basicConfig`, it leaves a root logger that already has handlers alone: the
    embedding program (or pytest) has decided where records go.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


class CallerGoneIsNoError(logging.Filter):
    """grpc.aio logs at ERROR, with a traceback, a call whose final status it could not send
    because the caller had gone (cancelled, or past its deadline) before grpc itself noticed.
    That race is grpc's, no handler sees it, and an operator can do nothing about it: the record
    passes at INFO, without the traceback, so that ERROR keeps meaning a fault of the server."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(CALLER_GONE):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.exc_info = record.exc_text = None
        return True


def lower_caller_gone_records() -> None:
    """Install `CallerGoneIsNoError` on grpc's logger, once however many servers are created."""
    grpc_logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, CallerGoneIsNoError) for f in grpc_logger.filters):
        grpc_logger.addFilter(CallerGoneIsNoError())
