"""Generate: greedy equals repeated top-1 steps, seeds reproduce, stop strings stop, cancellation is exact."""

import asyncio

import grpc
import pytest

from rnnserve.server.core.generate import StopStrings, continue_session
from rnnserve.server.core.sampling import Sampler, SamplingParams
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from serving import assert_prediction, create, error_details, position, slow_model
from test_batcher import with_core

pytestmark = pytest.mark.every_model

PROMPT = "The quick brown"


def prompt_length(bundle) -> int:
    """PROMPT's length in the bundle's tokens: its characters, or fewer subwords."""
    return len(bundle.vocab.encode(PROMPT))


def generate(stub, session_id, **fields) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(session_id=session_id, **fields)))


def test_greedy_generation_equals_repeated_top_one_steps(stub, bundle):
    generated = generate(stub, create(stub, prompt_text=PROMPT), max_tokens=12)
    stepped = create(stub)
    answer = stub.Step(pb.StepRequest(session_id=stepped, text=PROMPT, top_k=1))
    chosen = []
    for _ in range(12):
        token = answer.prediction.token_ids[0]
        chosen.append((token, answer.position + 1))
        answer = stub.Step(pb.StepRequest(session_id=stepped, token_ids=[token], top_k=1))
    assert [(g.token_id, g.position) for g in generated] == chosen
    # the texts streamed are the chosen ids' text (a character each, or subwords decoded incrementally)
    assert "".join(g.text for g in generated) == bundle.vocab.decode([token for token, _ in chosen])
    assert [g.finish_reason for g in generated] == [pb.FINISH_REASON_UNSPECIFIED] * 11 + [pb.FINISH_REASON_LENGTH]


def test_the_session_advances_by_what_was_generated(stub, bundle, unbatched):
    session_id = create(stub)
    generated = generate(stub, session_id, text=PROMPT, max_tokens=6, temperature=0.8, seed=3)
    assert position(stub, session_id) == prompt_length(bundle) + 6 == generated[-1].position
    answer = stub.Step(pb.StepRequest(session_id=session_id, text="!"))
    reference = unbatched(bundle)
    reference.feed(bundle.vocab.encode(PROMPT))
    reference.feed([g.token_id for g in generated])
    reference.feed(bundle.vocab.encode("!"))
    assert_prediction(answer.prediction, reference)


def test_a_seed_makes_a_sampled_continuation_reproducible(stub):
    settings = {"max_tokens": 20, "temperature": 1.5, "top_k": 20, "top_p": 0.95}
    first, second, other = (generate(stub, create(stub, prompt_text=PROMPT), seed=seed, **settings)
                            for seed in (11, 11, 12))
    assert [g.token_id for g in first] == [g.token_id for g in second]
    assert [g.token_id for g in first] != [g.token_id for g in other]
    assert all(0.0 < g.probability <= 1.0 for g in first)


def test_a_stop_string_ends_generation_after_it(stub):
    text = "".join(g.text for g in generate(stub, create(stub, prompt_text=PROMPT), max_tokens=30))
    stop = text[4:6]
    expected = text[: text.find(stop) + len(stop)]
    generated = generate(stub, create(stub, prompt_text=PROMPT), max_tokens=30, stop=["not there", stop])
    assert "".join(g.text for g in generated) == expected
    assert generated[-1].finish_reason == pb.FINISH_REASON_STOP


def test_generate_needs_something_to_continue_from(stub):
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, create(stub), max_tokens=3)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)[1] == ["token_ids"]


def test_a_position_mismatch_generates_nothing(stub, bundle):
    session_id = create(stub, prompt_text=PROMPT)
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, session_id, max_tokens=3, expected_position=2)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert position(stub, session_id) == prompt_length(bundle)


def test_cancelling_leaves_the_session_at_the_last_token_sent(start_server, bundle, unbatched):
    running = start_server()
    with grpc.insecure_channel(running.address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session_id = create(stub, prompt_text=PROMPT)
        slow_model(running, 0.05)  # a token every 50 ms: the cancel arrives long before a second one is sent
        call = stub.Generate(pb.GenerateRequest(session_id=session_id, max_tokens=50))
        received = [next(call) for _ in range(3)]
        call.cancel()
        answer = stub.Step(pb.StepRequest(session_id=session_id, text="!"))  # queued behind the generation's end
    # The session is where the last token the server sent left it: the third, or the fourth if its send raced
    # the cancel. Either way its state is exactly the prompt and the greedy tokens up to there.
    final, prompted = answer.position - 1, prompt_length(bundle)
    assert final - prompted in (3, 4) and received[-1].position == prompted + 3
    reference = unbatched(bundle)
    reference.feed(bundle.vocab.encode(PROMPT))
    for _ in range(final - prompted):
        reference.feed(reference.top_k(1)[0])
    reference.feed(bundle.vocab.encode("!"))
    assert_prediction(answer.prediction, reference)


def test_a_cancel_inside_a_send_whose_message_went_out_leaves_that_token_read(bundle):
    """The race of the test above, made certain: the client has the third token, and the handler's
    send is cancelled before it returns. The session must not stay a token behind the client."""
    async def scenario(core):
        session = core.session()
        await core.step(session, bundle.vocab.encode(PROMPT))
        delivered = []

        async def send(token):
            delivered.append(token)
            if len(delivered) == 3:
                raise asyncio.CancelledError  # written to the wire, yet the await never returned

        hold = await core.batcher.hold(session)
        try:
            with pytest.raises(asyncio.CancelledError):
                await continue_session(hold, core.pool, bundle.vocab, Sampler(SamplingParams()), 50, StopStrings(()),
                                       send)
        finally:
            hold.release()
        after = await core.step(session, [0])  # waits in the session's line for the generation's last read
        return delivered, after.position

    delivered, position_after = with_core(bundle, scenario)
    assert position_after - 1 == delivered[-1].position == prompt_length(bundle) + 3
