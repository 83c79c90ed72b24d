"""`rnnserve-client`: ask a running rnnserve server for predictions from the shell.

Each subcommand is one small function over `rnnserve.client.Client`; what it prints is decided
in `render`, so the library, the CLI and its --json output agree on every field.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rnnserve.client import cli_text, interactive, render
from rnnserve.client.connection import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, TLS
from rnnserve.client.errors import RnnserveError, Unauthenticated, Unavailable
from rnnserve.client.messages import DEFAULT_TOP_K
from rnnserve.client.retry import RetryPolicy
from rnnserve.client.sync import Client, Session
from rnnserve.client.types import ModelInfo, Prediction

DESCRIPTION = """\
Talk to an rnnserve server: a recurrent language model that keeps each session's state in
memory, so text can be fed a little at a time and the next token predicted after each piece.
Start a server first with `rnnserve-server`."""

EXAMPLES = """\
examples:
  rnnserve-client health
  rnnserve-client predict "To be, or not to b"
  rnnserve-client generate --prompt-file scene.txt --max-tokens 200
  cat scene.txt | rnnserve-client predict -
  rnnserve-client generate "Now is the winter of " --max-tokens 200 --temperature 0.8 --seed 1
  rnnserve-client interactive
  SID=$(rnnserve-client sessions create --prompt "Once upon")
  rnnserve-client predict " a ti" --session $SID
  rnnserve-client score $SID "me" "ny" "ger"
  rnnserve-client sessions fork $SID --count 2
  rnnserve-client sessions rewind $SID 3
  rnnserve-client sessions export $SID --out session.bin
  rnnserve-client sessions close $SID
  rnnserve-client states register intro "Once upon a time"
  rnnserve-client sessions create --initial-state intro
  rnnserve-client --json models
  rnnserve-client predict "To be" --model shakespeare-lstm --model-version 2
  rnnserve-client admin load shakespeare-lstm 2 --default --admin-token $ADMIN_TOKEN
  rnnserve-client admin unload shakespeare-lstm 1
  rnnserve-client admin share house-style "Answer briefly." --admin-token $ADMIN_TOKEN

Connection options may come before or after the command."""


def _connection_options() -> argparse.ArgumentParser:
    """Options every command accepts, before or after its name.

    They default to SUPPRESS so that a subcommand's copy does not overwrite a value given
    before the subcommand; `_with_defaults` fills in what was not given.
    """
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument("--address", default=argparse.SUPPRESS, metavar="HOST:PORT",
                       help=f"server address (env RNNSERVE_ADDRESS; default {DEFAULT_ADDRESS})")
    group.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                       help=f"deadline of each call (default {DEFAULT_TIMEOUT:g})")
    group.add_argument("--retries", type=int, default=argparse.SUPPRESS, metavar="N",
                       help=f"retries, with growing waits, of a call that found no server "
                            f"(default {RetryPolicy.retries})")
    group.add_argument("--token", default=argparse.SUPPRESS,
                       help="bearer token sent with every call (env RNNSERVE_TOKEN)")
    group.add_argument("--tls", action="store_true", default=argparse.SUPPRESS,
                       help="connect with TLS, trusting the system's root certificates")
    group.add_argument("--tls-ca", default=argparse.SUPPRESS, metavar="PEM",
                       help="connect with TLS, trusting this CA certificate instead")
    group.add_argument("--tls-cert", default=argparse.SUPPRESS, metavar="PEM",
                       help="client certificate, for servers that require mutual TLS (with --tls-key)")
    group.add_argument("--tls-key", default=argparse.SUPPRESS, metavar="PEM", help="client certificate's key")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print JSON, one object per line, instead of text")
    return common


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    defaults = {"address": os.environ.get("RNNSERVE_ADDRESS", DEFAULT_ADDRESS), "timeout": DEFAULT_TIMEOUT,
                "retries": RetryPolicy.retries, "token": os.environ.get("RNNSERVE_TOKEN"),
                "admin_token": os.environ.get("RNNSERVE_ADMIN_TOKEN"), "tls": False, "tls_ca": None,
                "tls_cert": None, "tls_key": None, "json": False}
    return argparse.Namespace(**{**defaults, **vars(args)})


def _positive(text: str) -> int:
    """An argument that must be a whole number of at least 1: refused with a usage line, not a traceback."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _file_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {error.strerror}") from None


def _add_step_options(parser: argparse.ArgumentParser) -> None:
    # Ranges are the server's: it knows the vocabulary, and states the range whatever the value (wire_numbers).
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                        help="how many candidates to show (default 5)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="softmax temperature for the shown probabilities (default 1)")


def _add_ttl(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--ttl", type=int, metavar="SECONDS",
                        help=f"idle seconds before expiry (default: {default})")


def _add_model_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--model", metavar="NAME", help=f"{what} (default: the server's default model)")
    parser.add_argument("--model-version", metavar="VERSION",
                        help="version of that model (default: its default version; `models` lists them)")


def _add_session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--session", metavar="ID", help="continue this session (left open) instead of a new one")
    _add_model_options(parser, "model to open a new session with")


def build_parser() -> argparse.ArgumentParser:
    common = _connection_options()
    parser = argparse.ArgumentParser(prog="rnnserve-client", description=DESCRIPTION, epilog=EXAMPLES,
                                     parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    command = _adder(commands, common)

    predict = command("predict", _predict, "show the most likely next tokens after TEXT")
    cli_text.add_text(predict, "text", "TEXT", "text to feed (a new session starts from nothing)")
    _add_step_options(predict)
    _add_session_options(predict)

    generate = command("generate", _generate, "continue PROMPT, printing the text as the server generates it "
                                               "(with --json: one object per token)")
    cli_text.add_text(generate, "prompt", "PROMPT", "text to feed first (optional with --session)", required=False)
    generate.add_argument("--max-tokens", type=int, default=100, metavar="N",
                          help="stop after N tokens (default 100)")
    generate.add_argument("--temperature", type=float, default=0.0, metavar="T",
                          help="0 (the default) always takes the most likely token; higher samples more freely")
    generate.add_argument("--top-k", type=int, default=None, metavar="K",
                          help="sample only among the K most likely tokens")
    generate.add_argument("--top-p", type=float, default=None, metavar="P",
                          help="sample only among the most likely tokens whose probabilities reach P")
    generate.add_argument("--seed", type=int, default=None, metavar="N",
                          help="make a sampled continuation reproducible")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop once TEXT is generated (repeatable)")
    _add_session_options(generate)

    interact = command("interactive", _interactive,
                       "show the top predictions as you type (with piped input: after each line)")
    interact.add_argument("--top-k", type=int, default=3, metavar="K", help="how many candidates to show (default 3)")
    _add_model_options(interact, "model to use")

    score = command("score", _score, "how likely each TEXT is to follow session ID (which does not advance)")
    score.add_argument("session", metavar="ID")
    score.add_argument("texts", metavar="TEXT", nargs="+", type=cli_text.text_argument,
                       help=f"a candidate continuation ({cli_text.STDIN} reads standard input)")

    peek = command("peek", _peek, "the prediction after TEXT, without feeding it to session ID")
    peek.add_argument("session", metavar="ID")
    cli_text.add_text(peek, "text", "TEXT", "text to look ahead with")
    _add_step_options(peek)

    _add_sessions(commands, common)
    _add_states(commands, common)

    models = command("models", _models, "list the loaded model versions (which are defaults, how many sessions "
                                         "run on each, which retire), or describe one")
    models.add_argument("name", metavar="NAME", nargs="?")
    models.add_argument("version", metavar="VERSION", nargs="?", help="(default: NAME's default version)")

    _add_admin(commands, common)

    health = command("health", _health, "check the server's health (exit status 0 when SERVING)")
    health.add_argument("--service", default="", help="a service name (default: the whole server)")
    return parser


Run = Callable[[Client, argparse.Namespace], int]
Adder = Callable[[str, Run, str], argparse.ArgumentParser]


def _adder(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> Adder:
    """What adds a command that runs `run`, taking the connection options, with `summary` as its help."""
    def add(name: str, run: Run, summary: str) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(run=run)
        return sub

    return add


def _group(commands: argparse._SubParsersAction, common: argparse.ArgumentParser, name: str, summary: str) -> Adder:
    """A command with actions of its own (`sessions create`); returns what adds one action."""
    group = commands.add_parser(name, parents=[common], help=summary, description=summary)
    return _adder(group.add_subparsers(title="actions", metavar="ACTION", required=True), common)


def _add_sessions(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    action = _group(commands, common, "sessions", "create, inspect, fork, rewind, move and close sessions by id")
    create = action("create", _session_create, "open a session and print its id (left open)")
    cli_text.add_text(create, "--prompt", "PROMPT", "text to feed the new session", required=False)
    _add_ttl(create, "the server's")
    _add_model_options(create, "model to run")
    create.add_argument("--initial-state", metavar="NAME", help="start from this named state instead of zeros")
    on_one = {name: action(name, run, summary) for name, run, summary in (
        ("get", _session_get, "show a session's position, times and how far it can rewind"),
        ("close", _session_close, "close a session and free its state"),
        ("fork", _session_fork, "copy a session (state and position) into new ones and print their ids"),
        ("reset", _session_reset, "take a session back to position 0 of its initial state"),
        ("rewind", _session_rewind, "undo a session's last N tokens and show the prediction there"),
        ("export", _session_export, "write a session to a file that `sessions import` continues from"))}
    for sub in on_one.values():
        sub.add_argument("session", metavar="ID")
    on_one["fork"].add_argument("--count", type=_positive, default=1, metavar="N", help="how many (default 1)")
    _add_ttl(on_one["fork"], "the source's")
    on_one["rewind"].add_argument("tokens", metavar="N", type=_positive, help="tokens to undo")
    _add_step_options(on_one["rewind"])
    on_one["export"].add_argument("--out", required=True, metavar="FILE", help="file to write (a few KiB)")
    imported = action("import", _session_import, "open a session continuing an exported one and print its id")
    imported.add_argument("state", metavar="FILE", type=_file_bytes, help="as written by `sessions export`")
    _add_ttl(imported, "the server's")


def _add_states(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    action = _group(commands, common, "states", "list, register and delete named states sessions can start from")
    listed = action("list", _states_list, "list the named states you may use: shipped, shared and your own")
    register = action("register", _states_register, "name the state after TEXT (replacing one of that name)")
    register.add_argument("name", metavar="NAME")
    cli_text.add_text(register, "text", "TEXT", "the prompt whose state is named")
    delete = action("delete", _states_delete, "forget one of your registered states")
    delete.add_argument("name", metavar="NAME")
    for sub in (listed, register, delete):
        _add_model_options(sub, "model whose named states these are, each version having its own")


def _add_admin(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    options = argparse.ArgumentParser(add_help=False, parents=[common])
    options.add_argument("--admin-token", default=argparse.SUPPRESS, metavar="TOKEN",
                         help="bearer token of the Admin service (env RNNSERVE_ADMIN_TOKEN; default: --token)")
    action = _group(commands, options, "admin", "load and unload model versions, choose the defaults and share "
                                                "named states with every caller (the Admin service)")
    load = action("load", _admin_load, "load VERSION of NAME from the server's model repository, checked first")
    load.add_argument("--default", action="store_true", help="then make it NAME's default for new sessions")
    unload = action("unload", _admin_unload, "stop serving VERSION of NAME: at once, or once its sessions end")
    default = action("default", _admin_default, "make VERSION NAME's default for new sessions (running ones stay)")
    default.add_argument("--server", action="store_true",
                         help="also make NAME the server's default (for requests naming no model)")
    for sub in (load, unload, default):
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("version", metavar="VERSION")
    share = action("share", _admin_share, "name the state after TEXT for every caller (read-only to them)")
    share.add_argument("name", metavar="NAME")
    share.add_argument("text", metavar="TEXT")
    unshare = action("unshare", _admin_unshare, "forget a state shared with every caller")
    unshare.add_argument("name", metavar="NAME")
    for sub in (share, unshare):
        _add_model_options(sub, "model whose named states these are, each version having its own")


def _show(args: argparse.Namespace, value: Any, as_text: Callable[[Any], str]) -> None:
    print(render.as_json(value) if args.json else as_text(value))


def _show_each(args: argparse.Namespace, values: list, as_row: Callable[[Any], str], header: str | None = None) -> None:
    """Several values: one JSON object per line, or one row each under `header`."""
    rows = [render.as_json(value) for value in values] if args.json else [as_row(value) for value in values]
    print("\n".join(rows if args.json or header is None else [header, *rows]))


@contextmanager
def _session(client: Client, args: argparse.Namespace) -> Iterator[Session]:
    """The session named by --session (left open), or a new one closed afterwards."""
    if args.session:
        yield client.resume(args.session)
    else:
        with client.session(model=args.model, model_version=args.model_version) as session:
            yield session


def _note_unknown(count: int, what: str = "the text") -> None:
    """Say on stderr that characters were read as the unknown token: the answer is about other text than typed."""
    if count:
        print(f"note: {count} character{'s' if count > 1 else ''} of {what} {'are' if count > 1 else 'is'} not in "
              f"the model's vocabulary and {'were' if count > 1 else 'was'} read as the unknown token",
              file=sys.stderr)


def _predict(client: Client, args: argparse.Namespace) -> int:
    with _session(client, args) as session:
        prediction = session.step(args.text, top_k=args.top_k, temperature=args.temperature)
        _note_unknown(prediction.unknown_characters)
        _show(args, prediction, render.prediction_table)
    return 0


def _generate(client: Client, args: argparse.Namespace) -> int:
    with _session(client, args) as session:
        tokens = iter(session.generate(args.max_tokens, tokens=args.prompt, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop))
        first = next(tokens, None)  # the request is checked and answered here: a refusal leaves no half-printed line
        _note_unknown(0 if first is None else first.unknown_characters, "the prompt")
        if args.prompt and not args.json:
            print(args.prompt, end="", flush=True)  # people read the continuation as part of the text
        for token in itertools.chain([] if first is None else [first], tokens):
            if args.json:
                print(render.as_json(token), flush=True)
            else:
                print(token.text, end="", flush=True)
    if not args.json:
        print()
    return 0


def _interactive(client: Client, args: argparse.Namespace) -> int:
    interactive.run(client, top_k=args.top_k, model=args.model, model_version=args.model_version,
                    json_lines=args.json)
    return 0


def _session_create(client: Client, args: argparse.Namespace) -> int:
    session = client.session(args.prompt, ttl=args.ttl, model=args.model, model_version=args.model_version,
                             initial_state=args.initial_state)
    _note_unknown(0 if session.prediction is None else session.prediction.unknown_characters, "the prompt")
    _show(args, session.info(), lambda info: info.id)  # the bare id, for SID=$(rnnserve-client sessions create)
    return 0


def _session_get(client: Client, args: argparse.Namespace) -> int:
    _show(args, client.resume(args.session).info(), render.session_details)
    return 0


def _session_close(client: Client, args: argparse.Namespace) -> int:
    session = client.resume(args.session)  # raises SessionNotFound: closing a wrong id must not pass silently
    session.close()
    _show(args, {"id": session.id, "closed": True}, lambda closed: f"closed {closed['id']}")
    return 0


def _session_fork(client: Client, args: argparse.Namespace) -> int:
    forks = client.resume(args.session).fork(args.count, ttl=args.ttl)
    _show_each(args, [{"id": fork.id, "position": fork.position} for fork in forks], lambda fork: fork["id"])
    return 0


def _session_reset(client: Client, args: argparse.Namespace) -> int:
    _show(args, client.resume(args.session).reset(), lambda info: f"reset {info.id} to position 0")
    return 0


def _session_rewind(client: Client, args: argparse.Namespace) -> int:
    session = client.resume(args.session)
    prediction = session.rewind(args.tokens, top_k=args.top_k, temperature=args.temperature)
    _show(args, prediction or Prediction(session.position, []), render.prediction_table)
    return 0


def _session_export(client: Client, args: argparse.Namespace) -> int:
    session = client.resume(args.session)
    state = session.export()
    try:
        with open(args.out, "wb") as file:
            file.write(state)
    except OSError as error:
        sys.exit(f"error: cannot write {args.out!r}: {error.strerror}")
    exported = {"id": session.id, "position": session.position, "file": args.out, "bytes": len(state)}
    _show(args, exported, lambda e: f"exported {e['id']} at position {e['position']} to {e['file']} "
                                    f"({e['bytes']} bytes)")
    return 0


def _session_import(client: Client, args: argparse.Namespace) -> int:
    _show(args, client.import_session(args.state, ttl=args.ttl).info(), lambda info: info.id)  # as create
    return 0


def _score(client: Client, args: argparse.Namespace) -> int:
    scores = client.resume(args.session).score(*args.texts)
    for index, score in enumerate(scores, 1):
        _note_unknown(score.unknown_characters, f"candidate {index}")
    _show_each(args, scores, render.score_row, render.SCORE_HEADER)
    return 0


def _peek(client: Client, args: argparse.Namespace) -> int:
    prediction = client.resume(args.session).peek(args.text, top_k=args.top_k, temperature=args.temperature)
    _note_unknown(prediction.unknown_characters)
    _show(args, prediction, render.prediction_table)
    return 0


def _states_list(client: Client, args: argparse.Namespace) -> int:
    _show_each(args, client.states(model=args.model, model_version=args.model_version), render.state_row,
               render.STATE_HEADER)
    return 0


def _states_register(client: Client, args: argparse.Namespace) -> int:
    state = client.register_state(args.name, args.text, model=args.model, model_version=args.model_version)
    _note_unknown(state.unknown_characters, "the prompt")
    _show(args, state, lambda s: f"registered {s.name} ({s.prompt_tokens} tokens)")
    return 0


def _states_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_state(args.name, model=args.model, model_version=args.model_version)
    _show(args, {"name": args.name, "deleted": True}, lambda deleted: f"deleted {deleted['name']}")
    return 0


def _models(client: Client, args: argparse.Namespace) -> int:
    if args.name:
        _show(args, client.model(args.name, args.version), render.model_details)
    else:
        _show_each(args, client.models(), render.model_row, render.MODEL_HEADER)
    return 0


def _admin_load(client: Client, args: argparse.Namespace) -> int:
    model = client.admin.load_model(args.name, args.version, make_default=args.default)
    _show(args, model, lambda m: f"loaded {m.name} version {m.version}"
                                 + (f", the default of {m.name}" if m.default_version else ""))
    return 0


def _admin_unload(client: Client, args: argparse.Namespace) -> int:
    _show(args, client.admin.unload_model(args.name, args.version), _unloaded)
    return 0


def _unloaded(model: ModelInfo) -> str:
    if model.sessions:
        return (f"{model.name} version {model.version} retires: it takes no new sessions and unloads once its "
                f"{model.sessions} running ones end")
    return f"unloaded {model.name} version {model.version}"


def _admin_default(client: Client, args: argparse.Namespace) -> int:
    model = client.admin.set_default_model(args.name, args.version, server_default=args.server)
    _show(args, model, lambda m: f"{m.name} version {m.version} is the default of {m.name}"
                                 + (" and of the server" if m.is_default else ""))
    return 0


def _admin_share(client: Client, args: argparse.Namespace) -> int:
    state = client.admin.register_shared_state(args.name, args.text, model=args.model, model_version=args.model_version)
    _show(args, state, lambda s: f"shared {s.name} ({s.prompt_tokens} tokens) with every caller")
    return 0


def _admin_unshare(client: Client, args: argparse.Namespace) -> int:
    client.admin.delete_shared_state(args.name, model=args.model, model_version=args.model_version)
    _show(args, {"name": args.name, "deleted": True}, lambda deleted: f"deleted the shared state {deleted['name']}")
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    _show(args, {"status": status}, lambda health: health["status"])
    return 0 if status == "SERVING" else 1


def _client(args: argparse.Namespace) -> Client:
    tls_files = (args.tls_ca, args.tls_cert, args.tls_key)
    tls = TLS.from_files(*tls_files) if any(tls_files) else args.tls
    return Client(args.address, timeout=args.timeout, retries=args.retries, tls=tls, token=args.token,
                  admin_token=args.admin_token)


def _explain(error: RnnserveError, args: argparse.Namespace) -> str:
    """The server's message (which names the field and the limit), and a hint when there is no server, or when
    an Admin call had no admin token."""
    if isinstance(error, Unavailable) and error.reason is None:
        return (f"error: {error}\n"
                f"  is a server running at {args.address}? Start one with `rnnserve-server`, or pass --address.")
    if isinstance(error, Unauthenticated) and args.run in (_admin_load, _admin_unload, _admin_default, _admin_share,
                                                           _admin_unshare):
        return (f"error: {error}\n"
                f"  Admin calls take a token of the server's --admin-tokens-file: pass --admin-token or set "
                f"RNNSERVE_ADMIN_TOKEN.")
    return f"error: {error}"


def main(argv: list[str] | None = None) -> None:
    args = cli_text.resolve(_with_defaults(build_parser().parse_args(argv)))
    try:
        with _client(args) as client:
            status = args.run(client, args)
    except RnnserveError as error:
        sys.exit(_explain(error, args))
    except UnicodeDecodeError as error:  # `interactive` reading standard input as it comes, line by line
        sys.exit(f"error: {cli_text.not_utf8('standard input', error)}")
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # Whoever read our output stopped (`rnnserve-client generate ... | head`): end quietly, as Unix tools
        # do, with SIGPIPE's status; stdout goes to /dev/null so that flushing it at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    sys.exit(status)


if __name__ == "__main__":
    main()
