"""Every handler of a servicer answers our errors with their status and details, in one place.

Applied once to the whole servicer at registration, so no method can be left unguarded; the
mapping itself is `errors.to_status`. (An aio interceptor would see the call, not the
handler's exception, and would run on every call.) Being where every call ends, it is also
where each call's method, status code and duration are reported to `on_rpc`, for metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import grpc
from grpc_status import rpc_status

from rnnserve.server.core.errors import to_status

log = logging.getLogger(__name__)

OK, CANCELLED = grpc.StatusCode.OK.value[0], grpc.StatusCode.CANCELLED.value[0]

RpcReport = Callable[[str, int, float], None]  # (method, google.rpc.Code, seconds)


def _guarded(handler: Callable, method: str, on_rpc: RpcReport | None) -> Callable:
    @functools.wraps(handler)
    async def guarded(request, context):
        started, code = time.perf_counter(), OK
        try:
            return await handler(request, context)
        except grpc.aio.AbortError:
            code = context.code().value[0]
            raise  # the call is already ended with a status
        except asyncio.CancelledError:
            code = CANCELLED  # the caller went away or its deadline passed
            raise
        except grpc.aio.InternalError as error:
            # grpc refused to send an answer because the call had ended: the caller's cancel or
            # deadline reached the write before it reached this task. Its cancel, not our fault.
            code = CANCELLED
            log.debug("%s ended before its answer was sent: %s", method, error)
            raise asyncio.CancelledError from error
        except Exception as error:  # to_status answers anything, unknown errors as INTERNAL
            status = to_status(error)
            code = status.code
            await context.abort_with_status(rpc_status.to_status(status))
        finally:
            if on_rpc is not None:
                on_rpc(method, code, time.perf_counter() - started)

    return guarded


class Guarded:
    """The servicer's methods, each wrapped by `_guarded`, reporting each call to `on_rpc` if given."""

    def __init__(self, servicer: object, on_rpc: RpcReport | None = None):
        self._servicer = servicer
        self._on_rpc = on_rpc

    def __getattr__(self, name: str) -> Callable:
        return _guarded(getattr(self._servicer, name), name, self._on_rpc)
