"""Log lines as JSON: one object per event, its traceback inside it."""

import json
import logging

from rnnserve.server.logs import GRPC_LOGGER, JsonFormatter, lower_caller_gone_records


def record(message: str, *args: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("rnnserve.server", logging.ERROR, __file__, 1, message, args, exc_info)


def test_an_event_is_one_json_line_with_its_fields():
    line = JsonFormatter().format(record("freed %d expired sessions", 3))
    event = json.loads(line)
    assert "\n" not in line
    assert event["message"] == "freed 3 expired sessions"
    assert event["level"] == "ERROR" and event["logger"] == "rnnserve.server"
    assert event["time"].endswith("+00:00")


def test_a_traceback_stays_inside_its_line():
    try:
        raise ValueError("the model call failed")
    except ValueError as error:
        line = JsonFormatter().format(record("a model call failed", exc_info=(type(error), error, error.__traceback__)))
    assert "\n" not in line
    assert "ValueError: the model call failed" in json.loads(line)["exception"]


def test_grpcs_record_of_a_caller_gone_is_info_and_other_errors_stay_errors(caplog):
    lower_caller_gone_records()
    lower_caller_gone_records()  # every server created installs it; it must act once
    grpc_logger = logging.getLogger(GRPC_LOGGER)
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError:
        grpc_logger.exception("ExecuteBatchError raised in core by servicer method [%s]", "/x.Inference/Generate")
        grpc_logger.exception("Unexpected [%s] raised by servicer method [%s]", "KeyError", "/x.Inference/Step")
    caller_gone, fault = caplog.records
    assert (caller_gone.levelname, caller_gone.exc_info) == ("INFO", None)
    assert "Inference/Generate" in caller_gone.getMessage()
    assert fault.levelname == "ERROR" and fault.exc_info is not None
