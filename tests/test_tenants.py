"""Nothing one identity does is visible to another through what the server shares: the prefix-state cache and the
named states (issue 22), over gRPC and over HTTP alike.

Two bearer tokens, alice and bob, on one server. Bob guessing alice's prompt hears exactly what a wrong guess
hears (the same `cached_prompt_tokens`: a hit is only ever possible for one's own prompts, so the time taken
tells nothing either), and alice's registered states do not exist for him: not listed, not usable, not
deletable, each answer the answer to a name nobody registered. States for everyone are registered through
Admin, and callers may use but not change them.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faces import ALICE, BOB, Failed, GrpcFace, HttpFace, serve_both_faces
from rnnserve.server.settings import Settings
from serving import RunningServer

NOTES = "Meeting notes: the acquisition price is {} dollars."
ADMIN = "admin-token-0123456789"


@pytest.fixture
def running(bundle, tmp_path):
    (tmp_path / "admin-tokens").write_text(f"{ADMIN} operator\n")
    server = serve_both_faces(bundle, tmp_path, admin_tokens_file=tmp_path / "admin-tokens")
    yield server
    server.stop()


def face(running: RunningServer, kind: str, token: str, service: str = "Inference") -> GrpcFace | HttpFace:
    """A caller with `token` over gRPC or over HTTP (where each service's routes take the same token)."""
    if kind == "grpc":
        return GrpcFace(running.address, token, service)
    return HttpFace(f"http://127.0.0.1:{running.server.http_port}", token)


@pytest.fixture(params=["grpc", "http"])
def faces(running, request):
    """alice, bob and the operator (the Admin service), over one face."""
    opened = [face(running, request.param, ALICE), face(running, request.param, BOB),
              face(running, request.param, ADMIN, "Admin")]
    yield opened
    for each in opened:
        each.close()


def cached(caller, prompt: str) -> int:
    """How many tokens of `prompt` a new session of `caller`'s started from the prefix-state cache."""
    return int(caller.call("CreateSession", {"prompt_text": prompt})["cached_prompt_tokens"])


def failure(call) -> Failed:
    with pytest.raises(Failed) as caught:
        call()
    return caught.value


def test_a_right_guess_of_another_identitys_prompt_answers_as_a_wrong_one(faces):
    alice, bob, _ = faces
    secret = NOTES.format(9172)
    assert cached(alice, secret) == 0
    guesses = [NOTES.format(price) + " " for price in (9171, 9172, 9173)]
    assert [cached(bob, guess) for guess in guesses] == [0, 0, 0]  # the step 2: 0, 53 and 0 before
    assert cached(alice, secret + " ") == len(secret)  # her own prompt is a hit, for her
    assert [cached(bob, guess) for guess in guesses] == [len(guess) for guess in guesses]  # his own, for him


def test_registered_states_belong_to_the_identity_that_registered_them(faces):
    alice, bob, _ = faces
    prompt = "Alice private notes: salary 123k"
    registered = alice.call("RegisterState", {"name": "alice-private", "prompt_text": prompt})
    assert (registered["name"], registered["source"]) == ("alice-private", "registered")

    def names(caller) -> list[str]:
        return [state["name"] for state in caller.call("ListStates", {})["states"]]

    assert "alice-private" in names(alice) and "alice-private" not in names(bob)
    # each of bob's calls naming it answers exactly as for a name nobody registered
    for call in (lambda name: bob.call("DeleteState", {"name": name}),
                 lambda name: bob.call("CreateSession", {"initial_state": name, "prompt_text": "a"})):
        mine, nobodys = failure(lambda: call("alice-private")), failure(lambda: call("nobody-s-name"))
        assert mine.status == nobodys.status == "NOT_FOUND"
        assert mine.message.replace("alice-private", "NAME") == nobodys.message.replace("nobody-s-name", "NAME")
        assert mine.http_code == nobodys.http_code
        assert "alice-private" not in nobodys.message  # nor is it among the names he is told exist
    assert cached(bob, prompt + " and more") == 0  # its prompt is pinned for alice alone
    assert cached(alice, prompt + " and more") == len(prompt)

    # bob's state of the same name is his own: alice's is untouched by it, and by his delete
    bob.call("RegisterState", {"name": "alice-private", "prompt_text": "bob's own"})
    bob.call("DeleteState", {"name": "alice-private"})
    [kept] = [state for state in alice.call("ListStates", {})["states"] if state["name"] == "alice-private"]
    assert int(kept["prompt_tokens"]) == len(prompt)
    session = alice.call("CreateSession", {"initial_state": "alice-private"})["session"]
    assert session["initial_state"] == "alice-private"
    alice.call("DeleteState", {"name": "alice-private"})
    assert "alice-private" not in names(alice)


def test_a_shared_state_is_registered_through_admin_and_read_only_to_callers(faces):
    alice, bob, admin = faces
    prompt = "House style: short answers"
    shared = admin.call("RegisterSharedState", {"name": "house-style", "prompt_text": prompt})
    assert (shared["name"], shared["source"]) == ("house-style", "shared")
    for caller in (alice, bob):
        [listed] = [state for state in caller.call("ListStates", {})["states"] if state["name"] == "house-style"]
        assert listed["source"] == "shared" and int(listed["prompt_tokens"]) == len(prompt)
        started = caller.call("CreateSession", {"initial_state": "house-style"})["session"]
        assert started["initial_state"] == "house-style"
        assert cached(caller, prompt + "!") == len(prompt)  # pinned for everyone
        for refused in (lambda: caller.call("DeleteState", {"name": "house-style"}),
                        lambda: caller.call("RegisterState", {"name": "house-style", "prompt_text": "mine now"})):
            error = failure(refused)
            assert error.status == "FAILED_PRECONDITION" and "shared with every caller" in error.message
    assert failure(lambda: admin.call("DeleteSharedState", {"name": "never-shared"})).status == "NOT_FOUND"
    admin.call("DeleteSharedState", {"name": "house-style"})
    assert "house-style" not in [state["name"] for state in bob.call("ListStates", {})["states"]]
    assert failure(lambda: alice.call("CreateSession", {"initial_state": "house-style"})).status == "NOT_FOUND"


def test_a_model_counts_the_callers_own_sessions_and_admin_everyones(faces):
    alice, bob, admin = faces
    for caller, count in ((alice, 2), (bob, 1)):
        for _ in range(count):
            caller.call("CreateSession", {})
    assert [int(model["sessions"]) for model in alice.call("ListModels", {})["models"]] == [2]
    [model] = bob.call("ListModels", {})["models"]
    assert int(model["sessions"]) == 1
    assert int(bob.call("GetModel", {"name": model["name"]})["sessions"]) == 1
    everyones = admin.call("SetDefaultModel", {"name": model["name"], "version": model["version"]})
    assert int(everyones["sessions"]) == 3


def test_the_global_scope_shares_cached_prompts_but_not_named_states(bundle, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} alice\n{BOB} bob\n")
    running = RunningServer(bundle, Settings(listen="127.0.0.1:0", auth_tokens_file=tokens,
                                             prefix_cache_scope="global"))
    alice, bob = face(running, "grpc", ALICE), face(running, "grpc", BOB)
    try:
        secret = NOTES.format(9172)
        assert cached(alice, secret) == 0
        assert cached(bob, secret + " ") == len(secret)  # the trade the operator chose: hits for anyone's prompt
        alice.call("RegisterState", {"name": "mine", "prompt_text": "Alice private notes"})
        assert "mine" not in [state["name"] for state in bob.call("ListStates", {})["states"]]  # names stay owned
    finally:
        alice.close()
        bob.close()
        running.stop()



def test_each_identity_evicts_only_its_own_prompts_and_the_identities_cached_are_bounded(bundle, tmp_path):
    carol = "token-of-carol-0123456789"
    (tmp_path / "tokens").write_text(f"{ALICE} alice\n{BOB} bob\n{carol} carol\n")
    running = RunningServer(bundle, Settings(listen="127.0.0.1:0", auth_tokens_file=tmp_path / "tokens",
                                             prefix_cache_entries=2, prefix_cache_identities=2))
    alice, bob, carol = (face(running, "grpc", token) for token in (ALICE, BOB, carol))
    try:
        prompts = [NOTES.format(price) for price in (1, 2, 3)]
        assert cached(bob, prompts[0]) == 0
        for prompt in prompts:  # two entries each: alice's third evicts her first, never bob's
            assert cached(alice, prompt) == 0
        assert cached(bob, prompts[0] + "!") == len(prompts[0])
        assert cached(alice, prompts[2] + "!") == len(prompts[2])
        assert cached(alice, prompts[0] + "!") == 0
        # a third identity, beyond --prefix-cache-identities 2: served, never from the cache
        assert cached(carol, prompts[1]) == 0 and cached(carol, prompts[1]) == 0
        assert cached(bob, prompts[0] + "?") == len(prompts[0])
    finally:
        for caller in (alice, bob, carol):
            caller.close()
        running.stop()


def test_each_identity_registers_at_most_its_own_share_of_named_states(bundle, tmp_path):
    (tmp_path / "tokens").write_text(f"{ALICE} alice\n{BOB} bob\n")
    running = RunningServer(bundle, Settings(listen="127.0.0.1:0", auth_tokens_file=tmp_path / "tokens",
                                             max_states_per_identity=2))
    alice, bob = face(running, "grpc", ALICE), face(running, "grpc", BOB)
    try:
        for name in ("one", "two"):
            alice.call("RegisterState", {"name": name, "prompt_text": "The"})
        refused = failure(lambda: alice.call("RegisterState", {"name": "three", "prompt_text": "The"}))
        assert refused.status == "RESOURCE_EXHAUSTED" and "named states" in refused.message
        [quota] = [detail for detail in refused.details if detail["@type"].endswith("QuotaFailure")]
        assert quota["violations"] == [{"subject": "identity", "description": "at most 2 named states"}]
        alice.call("RegisterState", {"name": "two", "prompt_text": "The quick"})  # replacing her own: no new one
        for name in ("one", "two"):  # bob's share is his own, whatever alice holds
            bob.call("RegisterState", {"name": name, "prompt_text": "The"})
        assert [state["name"] for state in alice.call("ListStates", {})["states"]] == ["one", "two"]
        alice.call("DeleteState", {"name": "one"})
        alice.call("RegisterState", {"name": "three", "prompt_text": "The"})
    finally:
        alice.close()
        bob.close()
        running.stop()


def test_an_identity_whose_cached_prompts_expired_leaves_room_for_another(bundle, tmp_path):
    (tmp_path / "tokens").write_text(f"{ALICE} alice\n{BOB} bob\n")
    running = RunningServer(bundle, Settings(listen="127.0.0.1:0", auth_tokens_file=tmp_path / "tokens",
                                             prefix_cache_identities=1, prefix_cache_idle_seconds=1.0,
                                             sweep_seconds=0.05))
    alice, bob = face(running, "grpc", ALICE), face(running, "grpc", BOB)
    try:
        prompt = NOTES.format(9172)
        assert cached(alice, prompt) == 0  # alice's partition is the one there is room for
        deadline = time.monotonic() + 30
        while cached(bob, prompt) == 0:  # once alice's entry expires, bob's prompt is cached, and hit next time
            assert time.monotonic() < deadline, "alice's idle entry never expired"
            time.sleep(0.05)
        assert cached(alice, prompt) == 0  # hers went by time alone, not for bob's sake: he had no partition
    finally:
        alice.close()
        bob.close()
        running.stop()

# Interleaved identities ------------------------------------------------------------------------------------------

EXAMPLES = 30
NAMES = st.sampled_from(["x", "y", "z"])  # few names, so that both identities use the same ones
PROMPTS = st.text(alphabet="The quick", min_size=0, max_size=12)
OPS = st.one_of(
    st.tuples(st.just("create"), PROMPTS, st.sampled_from(["", "x", "y"])),
    st.tuples(st.just("register"), NAMES, PROMPTS.filter(bool)),
    st.tuples(st.just("delete"), NAMES),
    st.tuples(st.just("list")),
    st.tuples(st.just("models")),
)


def answer(caller, op: tuple) -> tuple:
    """What `caller` receives for `op`, without what differs by nature between two runs (session ids, times)."""
    kind, *args = op
    try:
        if kind == "create":
            prompt, initial = args
            created = caller.call("CreateSession", {"prompt_text": prompt, "initial_state": initial})
            return (created["cached_prompt_tokens"], created["session"]["position"],
                    created["session"]["initial_state"], created.get("prediction", {}).get("token_ids"))
        if kind == "register":
            return tuple(caller.call("RegisterState", {"name": args[0], "prompt_text": args[1]}).values())
        if kind == "delete":
            return tuple(caller.call("DeleteState", {"name": args[0]}).values())
        if kind == "models":
            return tuple(model["sessions"] for model in caller.call("ListModels", {})["models"])
        return tuple(tuple(state.values()) for state in caller.call("ListStates", {})["states"])
    except Failed as error:
        return error.status, error.message


@pytest.fixture(scope="module")
def crowd(bundle, tmp_path_factory):
    """A server with four tokens for each example: its two interleaved identities, and each one's twin alone."""
    folder = tmp_path_factory.mktemp("crowd")
    tokens = [f"token-{i:04d}-0123456789" for i in range(4 * 5 * EXAMPLES)]  # shrinking a failure takes more
    (folder / "tokens").write_text("".join(f"{token} identity-{i}\n" for i, token in enumerate(tokens)))
    running = RunningServer(bundle, Settings(listen="127.0.0.1:0", auth_tokens_file=folder / "tokens",
                                             prefix_cache_min_tokens=4, prefix_cache_identities=len(tokens)))
    yield running, iter(tokens)
    running.stop()


def test_nothing_one_identity_receives_depends_on_anothers_calls(crowd):
    running, tokens = crowd

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from([0, 1]), OPS), min_size=1, max_size=16))
    def interleaved(ops: list[tuple[int, tuple]]) -> None:
        callers = [face(running, "grpc", next(tokens)) for _ in range(4)]  # 0 and 1 together; 2 and 3 alone
        try:
            together = [(who, answer(callers[who], op)) for who, op in ops]
            for who in (0, 1):
                alone = [answer(callers[2 + who], op) for each, op in ops if each == who]
                assert [received for each, received in together if each == who] == alone
        finally:
            for caller in callers:
                caller.close()

    interleaved()
