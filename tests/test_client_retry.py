"""Retry with backoff: only UNAVAILABLE, only calls safe to repeat, never sooner than the server asks."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from rnnserve.client import Client
from rnnserve.client.errors import InvalidArgument, RnnserveError, Unavailable
from rnnserve.client.retry import RetryPolicy
from serving import free_port

DOWN = Unavailable(grpc.StatusCode.UNAVAILABLE, "connection refused")


def test_backoff_grows_then_gives_up():
    policy = RetryPolicy(retries=3, initial_backoff=0.1, max_backoff=0.3, jitter=0.0)
    assert [policy.backoff(attempt, DOWN, retry_safe=True) for attempt in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(Unavailable):
        policy.backoff(3, DOWN, retry_safe=True)


def test_jitter_spreads_the_waits():
    waits = {RetryPolicy(initial_backoff=1.0, jitter=0.2).backoff(0, DOWN, retry_safe=True) for _ in range(20)}
    assert len(waits) > 1 and all(0.8 <= wait <= 1.2 for wait in waits)


def test_unsafe_calls_and_other_codes_are_not_retried():
    with pytest.raises(Unavailable):
        RetryPolicy().backoff(0, DOWN, retry_safe=False)
    with pytest.raises(InvalidArgument):
        RetryPolicy().backoff(0, InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "top_k"), retry_safe=True)


def test_a_call_a_stopping_server_cancelled_is_retried_like_unavailable():
    cancelled = RnnserveError(grpc.StatusCode.CANCELLED, "CANCELLED")  # what grpc answers calls reaching it mid-stop
    assert RetryPolicy(jitter=0.0).backoff(0, cancelled, retry_safe=True) == 0.2
    with pytest.raises(RnnserveError):
        RetryPolicy().backoff(0, cancelled, retry_safe=False)


def test_an_unknown_from_the_transport_is_retried_but_not_one_the_server_explained():
    """A proxy whose replica died mid-call answers UNKNOWN "Stream removed"; the server itself never answers
    UNKNOWN, and a status carrying its ErrorInfo is its considered answer."""
    removed = RnnserveError(grpc.StatusCode.UNKNOWN, "Stream removed (Data frame with END_STREAM flag received)")
    assert RetryPolicy(jitter=0.0).backoff(0, removed, retry_safe=True) == 0.2
    with pytest.raises(RnnserveError):
        RetryPolicy().backoff(0, removed, retry_safe=False)
    explained = RnnserveError(grpc.StatusCode.UNKNOWN, "odd", reason="SOMETHING_NEW")
    with pytest.raises(RnnserveError):
        RetryPolicy().backoff(0, explained, retry_safe=True)


def test_the_server_retry_delay_is_a_floor():
    draining = Unavailable(grpc.StatusCode.UNAVAILABLE, "draining", retry_after=3.0)
    assert RetryPolicy(initial_backoff=0.1).backoff(0, draining, retry_safe=True) == 3.0


def test_a_safe_call_waits_out_a_server_that_is_still_starting(bundle):
    address = f"127.0.0.1:{free_port()}"
    server = str(Path(sys.executable).with_name("rnnserve-server"))
    command = [server, "--listen", address, "--bundle", str(bundle.path)]
    processes = []
    starter = threading.Timer(1.0, lambda: processes.append(subprocess.Popen(command)))
    with Client(address, retries=10, timeout=5) as client:
        try:
            starter.start()  # the call below goes out before the server even exists
            assert [model.name for model in client.models()] == [bundle.name]
            assert client.health() == "SERVING"
        finally:
            starter.join()
            for process in processes:
                process.terminate()
                process.wait(10)


def test_opening_a_session_is_not_retried():
    with Client(f"127.0.0.1:{free_port()}", retries=10) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client.session()
        assert time.monotonic() - started < 1.0  # ten retries with backoff would take seconds
