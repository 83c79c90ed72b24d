"""Sessions at rest in Redis, and the fencing that keeps each session live on at most one replica.

One hash per session and one key per live replica:

    rnnserve:session:<id>      hash: owner, holder, record (a snapshot `SessionRecord` as JSON: times,
                               position, last step), state (the `session_blob` bytes, as ExportSession
                               answers them); it expires with the session (PEXPIRE = its idle time left)
    rnnserve:replica:<holder>  the lease of a live replica, renewed every lease / 3
    rnnserve:release:<holder>  a channel: ids of sessions that other replicas ask the holder to put at
                               rest, because routing now sends their calls there
    rnnserve:store             a marker: a random token set by the first replica that finds it missing, so
                               that a Redis come back empty is told apart from one that kept its data

A session hash may be a tombstone: no state, holder "", and a `lost` field (JSON: the replica that
put it at rest, and its position then), written by that replica when it finds the store came back
without it, so that any replica answers its id SESSION_LOST, never "does not exist". A replica that
still has the session live overwrites a tombstone with its next write.

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
from redis.exceptions import RedisError, ResponseError

SESSION_PREFIX = "rnnserve:session:"
REPLICA_PREFIX = "rnnserve:replica:"
RELEASE_PREFIX = "rnnserve:release:"
MARKER_KEY = "rnnserve:store"
LISTEN_SECONDS = 1.0  # how long one wait for a release request lasts before it is renewed

# KEYS[1] the session; ARGV owner, holder, replica prefix. Answers {status, ...}.
_CLAIM = """
local found = redis.call('HMGET', KEYS[1], 'owner', 'holder', 'record', 'state')
if not found[1] or found[1] ~= ARGV[1] then return {'missing'} end
local holder = found[2] or ''
if holder ~= '' and holder ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. holder) == 1 then
  return {'elsewhere', holder, redis.call('PTTL', ARGV[3] .. holder)}
end
if not found[4] then return {'lost', holder, found[3] or '', redis.call('HGET', KEYS[1], 'lost') or ''} end
redis.call('HSET', KEYS[1], 'holder', ARGV[2])
return {'claimed', found[3], found[4], redis.call('PTTL', KEYS[1])}
"""

# KEYS[1] the session; ARGV holder, the holder to leave ('' puts it at rest), owner, record, state ('' keeps the
# stored state), milliseconds to live. 1 when written; 0 when another replica holds it (the writer's copy is stale).
# A tombstone gives way: the replica writing has the session live, so it was not lost after all.
_WRITE = """
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder ~= ARGV[1] and redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'lost') == 0 then
  return 0
end
redis.call('HDEL', KEYS[1], 'lost')
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
# KEYS[1] the session; ARGV owner, lost (JSON), milliseconds to live. Only where nothing is stored: a session
# that survived (or that a live replica wrote again) is no tombstone's.
_TOMBSTONE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'holder', '', 'owner', ARGV[1], 'lost', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
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
    lease_ms: int  # how long the holder's lease has left: the longest a caller waits for it to lapse


class Lost(NamedTuple):
    """Registered by a replica that died before writing its state (`lost` empty), or a tombstone (`lost` its JSON)."""

    holder: str
    record: bytes
    lost: bytes


class Tombstone(NamedTuple):
    """A session that was at rest in a store come back without it: what is known of it (JSON), for its time left."""

    session_id: str
    owner: str
    lost: bytes
    milliseconds: int


@dataclass(frozen=True, slots=True)
class Persistence:
    """What Redis keeps across its own restart (CONFIG GET appendonly, appendfsync, save)."""

    appendonly: bool
    appendfsync: str
    save: str

    @property
    def keeps_nothing(self) -> bool:
        return not self.appendonly and not self.save.strip()


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
        self._tombstone = self.redis.register_script(_TOMBSTONE)

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
            return HeldElsewhere(answer[1].decode(), max(0, int(answer[2])))
        return Lost(answer[1].decode(), answer[2], answer[3]) if status == b"lost" else None

    async def write(self, writes: list[Write]) -> list[bool]:
        """Store each session in one round trip; False for one that another replica holds now."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for w in writes:
                await self._write([SESSION_PREFIX + w.session_id],
                                  [self.holder, "" if w.release else self.holder, w.owner, w.record, w.state,
                                   max(1, w.milliseconds)], client=pipe)
            return [bool(written) for written in await self._run(pipe.execute())]

    async def bury(self, tombstones: list[Tombstone]) -> list[bool]:
        """Write each tombstone where its session is missing, in one round trip; True for each written."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for t in tombstones:
                await self._tombstone([SESSION_PREFIX + t.session_id], [t.owner, t.lost, max(1, t.milliseconds)],
                                      client=pipe)
            return [bool(written) for written in await self._run(pipe.execute())]

    async def incarnation(self) -> str:
        """Which life of the store this is: Redis's run_id (a restart changes it, whether or not it kept its data;
        empty where INFO is refused) and the marker (changed when the store lost its keys)."""
        await self._run(self.redis.set(MARKER_KEY, secrets.token_hex(8), nx=True))  # a new one only where it is gone
        marker = await self._run(self.redis.get(MARKER_KEY))
        try:
            run_id = (await self.redis.info("server")).get("run_id", "")
        except ResponseError:  # INFO renamed away: the marker alone tells a store that lost its keys
            run_id = ""
        except (RedisError, OSError) as error:
            raise StoreFault(f"{type(error).__name__}: {error}") from error
        return f"{run_id}/{(marker or b'').decode()}"

    async def persistence(self) -> Persistence | None:
        """What the store keeps across its own restart; None where CONFIG is refused (renamed or disabled)."""
        try:
            config = await self.redis.config_get("appendonly", "appendfsync", "save")
        except ResponseError:
            return None
        except (RedisError, OSError) as error:
            raise StoreFault(f"{type(error).__name__}: {error}") from error
        return Persistence(config.get("appendonly") == "yes", config.get("appendfsync", ""), config.get("save", ""))

    async def forget(self, session_id: str) -> None:
        """Delete a closed session, if this replica still holds it."""
        await self._run(self._forget([SESSION_PREFIX + session_id], [self.holder]))

    async def release(self, session_id: str) -> None:
        """Put at rest, as it is stored, a session this replica is named the holder of but does not hold live: a
        claim it could not use (no room), or an older copy a store that lost the later writes kept."""
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
