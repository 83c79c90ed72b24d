"""The three vocabulary kinds: subword text streamed whole-character, stop strings across tokens, ids-only refusals."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from serving import assert_fails, create
from tiny_models import WORDS, TinySSM, tiny_corpus

from rnnserve.bundle import BundleError, load_bundle
from rnnserve.export import export_module
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc
from rnnserve.vocab import REPLACEMENT, IdVocabulary, TokenizerVocabulary

ALPHABET = "".join(sorted(set("".join(WORDS)))) + " .\n"


def streamed(vocab, ids: list[int]) -> list[str]:
    detokenizer = vocab.detokenizer()
    return [detokenizer.push(token) for token in ids] + [detokenizer.flush()]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40))
def test_streamed_subword_text_is_the_text_and_never_half_a_character(bundles, text):
    vocab = bundles["bpe"].vocab
    pieces = streamed(vocab, vocab.encode(text).tolist())
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in piece for piece in pieces)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_ids_stream_to_their_decoded_text(bundles, data):
    vocab = bundles["bpe"].vocab
    ids = data.draw(st.lists(st.integers(0, len(vocab) - 1), min_size=1, max_size=30))
    assert "".join(streamed(vocab, ids)) == vocab.decode(ids)


def trained(kind: str) -> TokenizerVocabulary:
    """A WordPiece or a Unigram (SentencePiece's Metaspace) tokenizer trained on the tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False)
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=200, show_progress=False)
    tokenizer.train_from_iterator(tiny_corpus().splitlines(), trainer)
    return TokenizerVocabulary(tokenizer.to_str())


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_other_tokenizer_kinds_stream_what_they_decode(kind):
    """Decoders that join pieces (WordPiece's "##", Metaspace's spaces) stream the text decoding all ids gives."""
    vocab = trained(kind)
    for text in ("the king speak hear", "café naïve über", "good lady. ill lord"):
        ids = vocab.encode(text).tolist()
        pieces = streamed(vocab, ids)
        assert "".join(pieces) == vocab.decode(ids) and len(ids) > 1


def test_generated_subword_text_joins_to_the_decoded_ids(bundles, start_server):
    bundle = bundles["bpe"]
    with grpc.insecure_channel(start_server(bundle).address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        generated = list(stub.Generate(pb.GenerateRequest(session_id=create(stub, prompt_text="café "),
                                                          max_tokens=40, temperature=1.0, seed=5)))
    ids = [g.token_id for g in generated]
    assert "".join(g.text for g in generated) == bundle.vocab.decode(ids)
    # every message but the last carries whole characters: a byte-level piece waits for the rest of its character
    assert not any(g.text.endswith(REPLACEMENT) for g in generated[:-1])


def test_a_stop_string_across_a_token_boundary_stops_generation(bundles, start_server):
    bundle = bundles["bpe"]
    with grpc.insecure_channel(start_server(bundle).address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)

        def generate(**fields):
            request = pb.GenerateRequest(session_id=create(stub, prompt_text="the king"), max_tokens=30, **fields)
            return list(stub.Generate(request))

        free = generate()
        texts = [g.text for g in free]
        boundary = next(i for i in range(1, len(texts)) if texts[i - 1] and texts[i])  # two tokens with text
        stop = texts[boundary - 1][-1] + texts[boundary][0]  # spans the boundary: in neither token's text alone
        stopped = generate(stop=[stop])
    text = "".join(g.text for g in stopped)
    assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP and stop in text
    assert text.find(stop) + len(stop) > len(text) - len(stopped[-1].text)  # it ended on the token completing it
    assert len(stopped) <= boundary + 1  # at the boundary, or earlier where the string occurred before
    assert [g.token_id for g in stopped] == [g.token_id for g in free[:len(stopped)]]


@pytest.fixture(scope="module")
def ids_bundle(tmp_path_factory):
    torch.manual_seed(3)
    return export_module(TinySSM(23), IdVocabulary(23), tmp_path_factory.mktemp("ids") / "ids", name="events")


@pytest.mark.parametrize("call, field", [
    (lambda stub, s: stub.CreateSession(pb.CreateSessionRequest(prompt_text="abc")), "prompt_text"),
    (lambda stub, s: stub.Step(pb.StepRequest(session_id=s, text="abc")), "text"),
    (lambda stub, s: stub.Score(pb.ScoreRequest(session_id=s, continuations=[pb.Continuation(text="a")])),
     "continuations[0].text"),
    (lambda stub, s: list(stub.Generate(pb.GenerateRequest(session_id=s, max_tokens=3, stop=["x"]))), "stop"),
    (lambda stub, s: stub.RegisterState(pb.RegisterStateRequest(name="n", prompt_text="abc")), "prompt_text"),
])
def test_an_ids_only_model_refuses_text_naming_the_field_and_changes_nothing(ids_bundle, start_server, call, field):
    with grpc.insecure_channel(start_server(ids_bundle).address) as channel:
        stub = rnnserve_pb2_grpc.InferenceStub(channel)
        session = create(stub, prompt_token_ids=[1, 2, 3])
        error, _ = assert_fails(lambda: call(stub, session), grpc.StatusCode.INVALID_ARGUMENT, field=field)
        assert "ids with no text" in error.details()
        assert stub.GetSession(pb.GetSessionRequest(session_id=session)).position == 3
        answer = stub.Step(pb.StepRequest(session_id=session, token_ids=[4], top_k=3))
        assert answer.position == 4 and list(answer.prediction.texts) == ["", "", ""]


def test_a_replaced_tokenizer_is_refused(bundles, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["bpe"].path, copy)
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzz"] = len(tokenizer["model"]["vocab"])
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(BundleError, match="tokenizer.json: sha256"):
        load_bundle(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="'tokenizer.json' is not in the bundle"):
        load_bundle(copy)


def test_a_format_1_bundle_is_still_read():
    from rnnserve.bundle import default_bundle_path

    bundle = load_bundle(default_bundle_path())
    assert bundle.manifest["format_version"] == 1 and bundle.vocab.kind == "characters"
    assert [(s.name, s.dtype) for s in bundle.states] == [("h", "float32"), ("c", "float32")]
