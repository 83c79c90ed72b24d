"""Soak load for test_soak.py: many sessions streaming over raw grpc.aio stubs, some of them misbehaving.

`python soak_load.py ADDRESS SESSIONS CONCURRENCY SEED`. Each of CONCURRENCY workers, on a
channel of its own, runs sessions one after another until SESSIONS have been created: create
(time-to-live 1 or 2 s), stream single-character steps, then end in one of `ENDINGS`, chosen at
random. It prints `created <id>` the moment a session exists, so that a run killed halfway
still reports its sessions, and at the end one JSON line: how the sessions ended and which
status codes the server answered. Deliberate client-side endings (a cancel, a missed
deadline, a dropped connection) are counted as endings, never as the server's codes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sys

import grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

ALPHABET = "the quick brown fox jumps over the lazy dog"
ENDINGS = ("close", "expire", "cancel", "deadline", "disconnect")
ENDING_WEIGHTS = (30, 30, 15, 15, 10)


class Tally:
    def __init__(self) -> None:
        self.endings: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()

    def answered(self, code: grpc.StatusCode | int) -> None:
        """Count a status code: a grpc.StatusCode, or the number an in-band error carries."""
        self.codes[code.name if isinstance(code, grpc.StatusCode) else _CODE_NAMES[code]] += 1


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


async def create(stub: rnnserve_pb2_grpc.InferenceStub, rng: random.Random) -> str:
    prompt = "".join(rng.choices(ALPHABET, k=rng.randint(0, 8)))
    created = await stub.CreateSession(pb.CreateSessionRequest(prompt_text=prompt, ttl_seconds=rng.choice((1, 2))))
    print("created", created.session.session_id, flush=True)
    return created.session.session_id


async def stream(call, session_id: str, steps: int, rng: random.Random, tally: Tally) -> bool:
    """Send `steps` steps one at a time, reading each answer; False once the server answers one with an error."""
    for _ in range(steps):
        await call.write(pb.StepRequest(session_id=session_id, text=rng.choice(ALPHABET)))
        reply = await call.read()
        tally.answered(reply.error.code if reply.HasField("error") else 0)
        if reply.HasField("error"):
            return False
    return True


async def one_session(stub: rnnserve_pb2_grpc.InferenceStub, ending: str, rng: random.Random, tally: Tally) -> None:
    session_id = await create(stub, rng)
    call = stub.Stream()
    steps = rng.randint(4, 24)
    if ending == "cancel":
        await stream(call, session_id, steps // 2, rng, tally)
        call.cancel()  # mid-stream, with the next step possibly on its way
        return
    await stream(call, session_id, steps, rng, tally)
    await call.done_writing()
    await call.code()  # the stream itself ends OK, whatever its steps answered
    if ending == "deadline":
        try:
            await stub.Step(pb.StepRequest(session_id=session_id, text="a"), timeout=0.0005)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    elif ending == "close":
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


async def disconnecting_session(address: str, rng: random.Random, tally: Tally) -> None:
    """A client that goes away mid-stream: its connection closes under a call still open."""
    channel = grpc.aio.insecure_channel(address)
    stub = rnnserve_pb2_grpc.InferenceStub(channel)
    session_id = await create(stub, rng)
    call = stub.Stream()
    await stream(call, session_id, rng.randint(1, 12), rng, tally)
    await call.write(pb.StepRequest(session_id=session_id, text="a"))
    await channel.close(grace=None)


async def worker(address: str, budget: collections.deque, rng: random.Random, tally: Tally) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        while budget:
            budget.pop()
            ending = rng.choices(ENDINGS, ENDING_WEIGHTS)[0]
            try:
                if ending == "disconnect":
                    await disconnecting_session(address, rng, tally)
                else:
                    await one_session(stub, ending, rng, tally)
            except grpc.aio.AioRpcError as error:  # an answer of the server's, counted for the test to judge
                tally.answered(error.code())
            tally.endings[ending] += 1


async def main(address: str, sessions: int, concurrency: int, seed: int) -> None:
    tally = Tally()
    budget = collections.deque(range(sessions))
    await asyncio.gather(*(worker(address, budget, random.Random(seed * 1000 + i), tally) for i in range(concurrency)))
    print(json.dumps({"endings": tally.endings, "codes": tally.codes}), flush=True)


if __name__ == "__main__":
    address, sessions, concurrency, seed = sys.argv[1], *map(int, sys.argv[2:])
    asyncio.run(main(address, sessions, concurrency, seed))
