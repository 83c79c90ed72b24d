"""InOrder hands out replies in request order, each once it has settled, however they complete."""

import asyncio

from rnnserve.server.faces.replies import InOrder


def test_replies_come_out_in_push_order_as_they_settle():
    async def scenario():
        loop = asyncio.get_running_loop()
        replies: InOrder[int] = InOrder()
        futures = [loop.create_future() for _ in range(4)]
        received = []

        async def writer():
            async for request, reply in replies:
                received.append((request, reply.result()))

        task = asyncio.create_task(writer())
        for index, future in enumerate(futures[:2]):
            replies.push(index, future)
        await asyncio.sleep(0)
        futures[1].set_result("b")  # the second settles first: nothing may come out yet
        await asyncio.sleep(0)
        assert received == []
        futures[0].set_result("a")
        replies.push(2, futures[2])
        replies.push(3, futures[3])
        futures[3].set_result("d")
        futures[2].set_result("c")
        replies.close()
        await asyncio.wait_for(task, 1)
        return received

    assert asyncio.run(scenario()) == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]


def test_abandon_withdraws_what_was_not_handed_out_and_ends_the_writer_after_its_current_reply():
    async def scenario():
        loop = asyncio.get_running_loop()
        replies: InOrder[int] = InOrder()
        futures = [loop.create_future() for _ in range(3)]
        for index, future in enumerate(futures):
            replies.push(index, future)
        futures[0].set_result("a")
        handed_out = []

        async def writer():
            async for request, _ in replies:
                handed_out.append(request)
                await asyncio.sleep(0)  # a write in flight when the stream is abandoned

        task = asyncio.create_task(writer())
        await asyncio.sleep(0)
        replies.abandon()
        await asyncio.wait_for(task, 1)
        return handed_out, [future.cancelled() for future in futures]

    assert asyncio.run(scenario()) == ([0], [False, True, True])
