"""W2 through the Open Inference Protocol face: tritonclient's asyncio gRPC client runs Triton sequences at 1, 64
and 256 sequences, over unary ModelInfer calls and over a ModelStreamInfer stream per sequence, beside
rnnserve's own stream on the same server.

The load generator is tritonclient itself, as a Triton user has it (its InferInput, its result
objects), so its CPU per token is the client's whole cost, reported apart from the server's. Each
sequence is started with its first token and ended after the loop, outside the timed steps.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Sequence

import numpy as np
import tritonclient.grpc.aio as triton

from bench.load import RoundTrip, StepFailed, closed_loop, connect
from bench.processes import ServerProcess
from bench.sizes import Sizes
from bench.stats import Results, Timed
from bench.workloads import stream_steps

V2_SEQUENCES = (1, 64, 256)
V2_FLAGS = ["--v2-listen", "127.0.0.1:0"]
V2_PORT_LINE = re.compile(r"KServe v2\) over gRPC on \S+, port (\d+)")  # rnnserve-server's log


def v2_port(process: ServerProcess) -> int:
    return process.announced_port(V2_PORT_LINE, "a v2 gRPC port")


def token_input(token: int) -> triton.InferInput:
    tensor = triton.InferInput("TOKEN_IDS", [1, 1], "INT64")
    tensor.set_data_from_numpy(np.array([[token]], np.int64))
    return tensor


def unary_round_trip(client: triton.InferenceServerClient, model: str, sequence_id: int,
                     tokens: itertools.cycle) -> RoundTrip:
    """One step of the sequence as its own ModelInfer call."""

    async def round_trip() -> None:
        await client.infer(model, [token_input(next(tokens))], sequence_id=sequence_id)

    return round_trip


class SequenceStream:
    """A ModelStreamInfer call of one sequence, its requests fed from a queue and its answers read one at a time."""

    def __init__(self, client: triton.InferenceServerClient, model: str, sequence_id: int):
        self._model, self._sequence_id = model, sequence_id
        self._requests: asyncio.Queue = asyncio.Queue()
        self._answers = client.stream_infer(self._feed())

    async def _feed(self) -> AsyncIterator[dict]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def step(self, token: int, **flags: bool) -> None:
        self._requests.put_nowait({"model_name": self._model, "inputs": [token_input(token)],
                                   "sequence_id": self._sequence_id, **flags})
        _result, error = await self._answers.__anext__()
        if error is not None:
            raise StepFailed(f"sequence {self._sequence_id}: {error}")

    async def close(self) -> None:
        self._requests.put_nowait(None)
        async for _ in self._answers:  # the stream's end
            pass


async def v2_steps(port: int, model: str, count: int, sizes: Sizes, tokens: Sequence[int], server_pid: int,
                   streamed: bool) -> Timed:
    """`count` sequences, each a closed loop of one-token steps over its own stream or as unary calls."""
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    ids = range(1, count + 1)
    try:
        for sequence_id in ids:  # started one by one: the first token is not a timed step
            await client.infer(model, [token_input(tokens[0])], sequence_id=sequence_id, sequence_start=True)
        if streamed:
            streams = [SequenceStream(client, model, sequence_id) for sequence_id in ids]
            feeds = [itertools.cycle(tokens) for _ in ids]
            trips = [lambda stream=stream, feed=feed: stream.step(next(feed)) for stream, feed in zip(streams, feeds)]
            timed = await closed_loop(trips, sizes.w2_steps, sizes.warmup_steps, server_pid)
            await asyncio.gather(*(stream.close() for stream in streams))
        else:
            trips = [unary_round_trip(client, model, i, itertools.cycle(tokens)) for i in ids]
            timed = await closed_loop(trips, sizes.w2_steps, sizes.warmup_steps, server_pid)
        for sequence_id in ids:
            await client.infer(model, [token_input(tokens[0])], sequence_id=sequence_id, sequence_end=True)
    finally:
        await client.close()
    return timed


async def kserve_v2(process: ServerProcess, model: str, sizes: Sizes, tokens: Sequence[int],
                    results: Results) -> None:
    """W2 at each sequence count through the v2 face (unary and streamed), and rnnserve's own stream beside it."""
    port = v2_port(process)
    async with connect(process) as server:
        for count in V2_SEQUENCES:
            results.add_loop("W2", "v2-native-stream", count,
                             await stream_steps(server, count, sizes.w2_steps, sizes.warmup_steps, tokens))
            for variant, streamed in (("v2-unary", False), ("v2-stream", True)):
                results.add_loop("W2", variant, count,
                                 await v2_steps(port, model, count, sizes, tokens, server.pid, streamed))
