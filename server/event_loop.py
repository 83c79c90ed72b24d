"""The event loop the server runs on: uvloop where it is installed, else asyncio's own.

Every step a stream carries costs the loop a few callbacks (a read completes, a reply future
settles, the writer wakes, a write completes), and uvloop runs each in C. Measured on the
2-core machine with the reference model at 256 streams: the loop's thread spent 3.1-3.2 s of
CPU per 52,000 steps instead of 3.9-4.1, and the streams moved 7,300-7,400 tokens/s instead of
6,400-6,900. The echo floor (bench/echo.py) runs on the same loop, so that it stays the best
this transport does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

try:
    import uvloop
except ImportError:  # not built for this platform (Windows): asyncio's loop serves the same API
    uvloop = None

Result = TypeVar("Result")

EVENT_LOOPS = ("uvloop", "asyncio") if uvloop is not None else ("asyncio",)
DEFAULT_EVENT_LOOP = EVENT_LOOPS[0]


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new loop of kind `name` (one of EVENT_LOOPS)."""
    return uvloop.new_event_loop if name == "uvloop" else asyncio.new_event_loop


def run(main: Coroutine[Any, Any, Result], name: str) -> Result:
    """asyncio.run on a loop of kind `name` (one of EVENT_LOOPS)."""
    return uvloop.run(main) if name == "uvloop" else asyncio.run(main)
