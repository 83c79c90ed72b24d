"""The request reader's shortcut for plain single-token steps reads exactly what the general path reads.

Most steps are one id with every option at its default, so the reader answers those from a
table made at start; a step that differs from that in any field must take the general path,
with its checks.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rnnserve.server.core.errors import InvalidArgument
from rnnserve.server.faces.convert import RequestReader
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb


@pytest.fixture(scope="module")
def reader(bundle) -> RequestReader:
    return RequestReader(bundle, Settings())


def general_read(reader: RequestReader, request: pb.StepRequest):
    """The reading of `request` with the shortcut out of reach: the same step with its defaults spelled out."""
    explicit = pb.StepRequest()
    explicit.CopyFrom(request)
    explicit.token_ids.append(0)  # two ids never take the shortcut; the extra id is dropped below
    read = reader.step(explicit)
    return read.tokens[:-1], read.top_k, read.temperature, read.expected_position


@given(token=st.integers(0, 2**31 - 1))
def test_a_plain_step_reads_as_the_general_path_reads_it(reader, token):
    request = pb.StepRequest(session_id="s", token_ids=[token % reader.vocab_size])
    read = reader.step(request)
    tokens, top_k, temperature, expected = general_read(reader, request)
    assert np.array_equal(read.tokens, tokens)
    assert (read.top_k, read.temperature, read.expected_position) == (top_k, temperature, expected)


@pytest.mark.parametrize("options", [{"top_k": 2}, {"temperature": 0.5}, {"expected_position": 0}])
def test_a_single_token_step_with_any_option_keeps_that_option(reader, options):
    read = reader.step(pb.StepRequest(session_id="s", token_ids=[1], **options))
    field, value = next(iter(options.items()))
    assert getattr(read, field) == pytest.approx(value)


@pytest.mark.parametrize("token", [-1, 10_000])
def test_a_single_id_outside_the_vocabulary_is_refused_by_name(reader, token):
    with pytest.raises(InvalidArgument) as refused:
        reader.step(pb.StepRequest(session_id="s", token_ids=[token]))
    assert refused.value.field == "token_ids"


def test_a_single_id_with_text_is_refused_as_both(reader):
    with pytest.raises(InvalidArgument) as refused:
        reader.step(pb.StepRequest(session_id="s", token_ids=[1], text="a"))
    assert refused.value.field == "text"
