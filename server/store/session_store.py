"""Sessions at rest in Redis, and the fencing that keeps each session live on at most one replica.

One hash per session and one key per live replica:

    rnnserve:session:<id>      hash: owner, holder, record (a snapshot `SessionRecord` as JSON: times,
                               position, last step), state (the `session_blob` bytes, as ExportSession
                               answers them); it expires with the session (PEXPIRE = its idle time left)
    rnnserve:replica:<holder>  the lease of a live replica, renewed every lease / 3
    rnnserve:release:<holder>  a channel: ids of sessions that other replicas ask the holder to put at
                               rest, because routing now sends their calls there

`holder` names the replica that has the session live, as "<replica id>/<incarnation>" (a random
incarnation per process, so a replica restarted under the same id holds nothing of its former
life), or "" for a session at rest. Every change is a compare-and-set run inside Redis by a Lua
script, so two replicas can never both take a session: a replica takes one only when it is at
rest or its holder's lease has lapsed (`claim`), and writes one only while it is still the
holder (`write`); a refused write tells the replica that its copy is stale and must go.

Only this module speaks Redis. It uses redis-py's asyncio client with the hiredis parser: the
maintained client (the Redis project's own), pipelining without a thread per call, and a C
parser for the replies that carry state bytes. Every failure to reach Redis is `StoreFault`.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple

from redis import asyncio as aioredis
from redis.exceptions import RedisError

SESSION_PREFIX = "rnnserve:session:"
REPLICA_PREFIX = "rnnserve:replica:"
RELEASE_PREFIX = "rnnserve:release:"
LISTEN_SECONDS = 1.0  # how long one wait for a release request lasts before it is renewed

# KEYS[1] the session; ARGV owner, holder, replica prefix. Answers {status, ...}.
_CLAIM = """
local found = redis.call('HMGET', KEYS[1], 'owner', 'holder', 'record', 'state')
if not found[1] or found[1] ~= ARGV[1] then return {'missing'} end
local holder = found[2] or ''
if holder ~= '' and holder ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. holder) == 1 then
  return {'elsewhere', holder}
end
if not found[4] then return {'lost'} end
redis.call('HSET', KEYS[1], 'holder', ARGV[2])
return {'claimed', found[3], found[4], redis.call('PTTL', KEYS[1])}
"""

# KEYS[1] the session; ARGV holder, the holder to leave ('' puts it at rest), owner, record, state ('' keeps the
# stored state), milliseconds to live. 1 when written; 0 when another replica holds it (the writer's copy is stale).
_WRITE = """
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder ~= ARGV[1] and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'holder', ARGV[2], 'owner', ARGV[3], 'record', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[5]) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""

# KEYS[1] the session; ARGV holder. Deletes it (a close) or puts it back at rest (a claim given up) if still held.
_FORGET = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
_RELEASE = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then redis.call('HSET', KEYS[1], 'holder', '') end
return 1
"""


class StoreFault(Exception):
    """Redis could not be reached or answered in time; nothing is known to have changed."""


@dataclass(frozen=True, slots=True)
class Write:
    """A session's record to store; `state` b"" keeps the stored state (a registration without one)."""

    session_id: str
    owner: str
    record: bytes
    state: bytes
    milliseconds: int  # its idle time left: the key expires with the session
    release: bool  # put it at rest (hibernation, a hand-off) instead of keeping it held


class Claimed(NamedTuple):
    record: bytes
    state: bytes
    milliseconds: int  # the key's time left


class HeldElsewhere(NamedTuple):
    holder: str


class Lost(NamedTuple):
    """Registered by a replica that died before writing its state."""


def replica_holder(replica_id: str) -> str:
    """This process's holder name: the replica id and an incarnation no other process has."""
    return f"{replica_id}/{secrets.token_hex(4)}"


class SessionStore:
    def __init__(self, url: str, holder: str, *, lease_seconds: float, timeout_seconds: float):
        self.holder = holder
        self.lease_ms = int(lease_seconds * 1000)
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout_seconds,
                                             socket_connect_timeout=timeout_seconds)
        self._claim = self.redis.register_script(_CLAIM)
        self._write = self.redis.register_script(_WRITE)
        self._forget = self.redis.register_script(_FORGET)
        self._release = self.redis.register_script(_RELEASE)

    async def close(self) -> None:
        await self.redis.aclose()

    async def claim(self, session_id: str, owner: str) -> Claimed | HeldElsewhere | Lost | None:
        """Take the session at rest (or whose holder's lease lapsed) for this replica; None when there is none of
        `owner`'s: another caller's session does not exist for this one, here as everywhere."""
        answer = await self._run(self._claim([SESSION_PREFIX + session_id], [owner, self.holder, REPLICA_PREFIX]))
        status = answer[0]
        if status == b"claimed":
            return Claimed(answer[1], answer[2], int(answer[3]))
        if status == b"elsewhere":
            return HeldElsewhere(answer[1].decode())
        return Lost() if status == b"lost" else None

    async def write(self, writes: list[Write]) -> list[bool]:
        """Store each session in one round trip; False for one that another replica holds now."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for w in writes:
                await self._write([SESSION_PREFIX + w.session_id],
                                  [self.holder, "" if w.release else self.holder, w.owner, w.record, w.state,
                                   max(1, w.milliseconds)], client=pipe)
            return [bool(written) for written in await self._run(pipe.execute())]

    async def forget(self, session_id: str) -> None:
        """Delete a closed session, if this replica still holds it."""
        await self._run(self._forget([SESSION_PREFIX + session_id], [self.holder]))

    async def release(self, session_id: str) -> None:
        """Give back a claim this replica could not use (no room): the session stays at rest for another."""
        await self._run(self._release([SESSION_PREFIX + session_id], [self.holder]))

    async def ask_release(self, holder: str, session_id: str) -> bool:
        """Ask `holder` to put the session at rest; False when no replica of that name listens (it died)."""
        return bool(await self._run(self.redis.publish(RELEASE_PREFIX + holder, session_id)))

    async def release_requests(self) -> AsyncIterator[str]:
        """The ids of sessions other replicas ask this one to put at rest, as they come."""
        listener = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._run(listener.subscribe(RELEASE_PREFIX + self.holder))
            while True:
                message = await self._run(listener.get_message(timeout=LISTEN_SECONDS))
                if message is not None:
                    yield message["data"].decode()
        finally:
            await listener.aclose()

    async def renew_lease(self) -> bool:
        """Renew this replica's lease; False when it had lapsed (or this is the first), so that sessions held
        meanwhile may have been taken by others."""
        previous = await self._run(self.redis.set(REPLICA_PREFIX + self.holder, b"1", px=self.lease_ms, get=True))
        return previous is not None

    async def still_held(self, session_ids: list[str]) -> list[bool]:
        """Whether this replica is still the holder of each session (or no one has it): after a lapsed lease."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.hget(SESSION_PREFIX + session_id, "holder")
            holders = await self._run(pipe.execute())
        return [holder is None or holder.decode() == self.holder for holder in holders]

    @staticmethod
    async def _run(call):
        try:
            return await call
        except (RedisError, OSError) as error:
            raise StoreFault(f"{type(error).__name__}: {error}") from error
