"""Every handler of a servicer answers our errors with their status and details, in one place.

Applied once to the whole servicer at registration, so no method can be left unguarded; the
mapping itself is `errors.to_status`. (An aio interceptor would see the call, not the
handler's exception, and would run on every call.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import grpc
from grpc_status import rpc_status

from rnnserve.server.errors import to_status


def _guarded(handler: Callable) -> Callable:
    @functools.wraps(handler)
    async def guarded(request, context):
        try:
            return await handler(request, context)
        except grpc.aio.AbortError:
            raise  # the call is already ended with a status
        except Exception as error:  # to_status answers anything, unknown errors as INTERNAL
            await context.abort_with_status(rpc_status.to_status(to_status(error)))

    return guarded


class Guarded:
    """The servicer's methods, each wrapped by `_guarded`."""

    def __init__(self, servicer: object):
        self._servicer = servicer

    def __getattr__(self, name: str) -> Callable:
        return _guarded(getattr(self._servicer, name))
