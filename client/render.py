"""How `rnnserve-client` shows results: plain text for people, one JSON object per line for programs.

Tokens are single characters, often blanks or line breaks, so they are always shown quoted
(`' '`, `'\\n'`): an invisible prediction would read as a bug.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime

from rnnserve.client.types import ContinuationScore, ModelInfo, NamedState, Prediction, SessionInfo


def token(text: str) -> str:
    return repr(text)


def as_json(value: object) -> str:
    """One line of JSON for a value from `rnnserve.client.types` (or a plain dict); times in ISO 8601."""
    fields = value if isinstance(value, dict) else dataclasses.asdict(value)
    return json.dumps(fields, ensure_ascii=False, default=datetime.isoformat)


def prediction_table(prediction: Prediction) -> str:
    if not prediction.candidates:  # a session rewound to position 0 of zeros
        return f"position {prediction.position}: nothing read, so nothing predicted"
    rows = [f"{'rank':>4}  {'token':<8} {'probability':>11}  {'logprob':>8}  {'id':>5}"]
    rows += [f"{rank:>4}  {token(c.text):<8} {c.probability:>11.2%}  {c.logprob:>8.3f}  {c.id:>5}"
             for rank, c in enumerate(prediction.candidates, 1)]
    return "\n".join(rows)


def prediction_inline(prediction: Prediction) -> str:
    """The candidates on one line, for showing beside what the user types."""
    return "  ".join(f"{token(c.text)} {c.probability:.0%}" for c in prediction.candidates)


SCORE_HEADER = f"{'logprob':>9}  {'per token':>9}  {'ranks':<16} text"


def score_row(score: ContinuationScore) -> str:
    """A candidate's total and per-token log-probability (per token compares candidates of unequal length)."""
    ranks = ",".join(map(str, score.ranks))
    return f"{score.total_logprob:>9.3f}  {score.total_logprob / len(score.token_ids):>9.3f}  {ranks:<16} " \
           f"{token(score.text)}"


STATE_HEADER = f"{'name':<24} {'source':<10} {'tokens':>6}  prompt"


def state_row(state: NamedState) -> str:
    return f"{state.name:<24} {state.source:<10} {state.prompt_tokens:>6}  {token(state.prompt_text)}"


def _local(moment: datetime) -> str:
    return moment.astimezone().isoformat(sep=" ", timespec="seconds")


def session_details(info: SessionInfo) -> str:
    fields = {"id": info.id, "model": f"{info.model} version {info.model_version}", "position": info.position,
              "rewindable": info.rewindable,
              "starts from": info.initial_state or "zeros", "created": _local(info.created),
              "last active": _local(info.last_active), "expires": _local(info.expires)}
    return _key_values(fields)


def default_mark(model: ModelInfo) -> str:
    """Whose default a version is: "server" (requests naming no model get it), "model" (requests naming its
    model and no version get it), or "" for neither."""
    return "server" if model.is_default else "model" if model.default_version else ""


MODEL_HEADER = (f"{'name':<24} {'version':<8} {'cell':<5} {'layers':>6} {'hidden':>6} {'vocab':>6} {'sessions':>8}  "
                f"{'default':<7}  retiring")


def model_row(m: ModelInfo) -> str:
    return (f"{m.name:<24} {m.version:<8} {m.cell:<5} {m.layers:>6} {m.hidden_size:>6} {m.vocab_size:>6} "
            f"{m.sessions:>8}  {default_mark(m):<7}  {'yes' if m.retiring else ''}").rstrip()


def model_details(model: ModelInfo) -> str:
    fields = {"name": model.name, "version": model.version, "cell": model.cell, "layers": model.layers,
              "hidden size": model.hidden_size, "embed size": model.embed_size, "vocab size": model.vocab_size,
              "vocabulary": model.vocabulary,
              "states": ", ".join(f"{name} {list(shape)} {dtype}" for name, (shape, dtype) in model.states.items()),
              "state bytes/session": model.state_bytes_per_session, "sha256": model.sha256,
              "default": {"server": "of the server", "model": f"of {model.name}"}.get(default_mark(model), "no"),
              "sessions": model.sessions, "retiring": "yes" if model.retiring else "no",
              **{f"metric {name}": f"{value:g}" for name, value in sorted(model.metrics.items())}}
    return _key_values(fields)


def _key_values(fields: dict[str, object]) -> str:
    width = max(map(len, fields))
    return "\n".join(f"{name:<{width}}  {value}" for name, value in fields.items())
