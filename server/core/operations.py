"""Session operations beyond stepping: fork, reset, rewind, score, peek, export and import, named states.

Each is cheap because a session's whole past is one row of the state pool: a fork copies the row,
a reset writes the initial state into it, an export is its bytes. Each runs under a `Hold` on the
session, so it sees the session after the work queued before it and no step of the session
runs meanwhile; a change is committed only once nothing can fail any more, so a refusal leaves
the session as it was. Model calls that commit nothing (score, peek, a rewind's replay) run on
the batcher's model thread but outside its batches. Each works on the session's own model
version: its pool, its batcher, its named states.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from rnnserve.server.core.batcher import NEXT_LOGITS, StepAnswer
from rnnserve.server.core.errors import IncompatibleState, InvalidArgument, RewindBeyondDepth
from rnnserve.server.core.history import Checkpoint, History
from rnnserve.server.core.models import ModelRegistry
from rnnserve.server.core.named_states import IMPORTED, NamedState
from rnnserve.server.core.prediction import Prediction
from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.core.sessions import Session, SessionTable
from rnnserve.server.model.state_pool import Row
from rnnserve.server.store.session_blob import FIELD, PortableSession, decode, encode, exported_model

NOTHING_READ = "the session has read nothing yet, so nothing predicts its next token: step at least one token first"


@dataclass(frozen=True, slots=True)
class Scored:
    """One candidate continuation's log-probabilities (temperature 1) and ranks (1 = most likely), token by token."""

    tokens: np.ndarray  # [time] int64
    texts: list[str]  # each token's, in the session's model's vocabulary
    logprobs: np.ndarray  # [time] float32
    ranks: np.ndarray  # [time] int64

    @property
    def total(self) -> float:
        return float(np.sum(self.logprobs, dtype=np.float64))


def score_rows(next_logits: np.ndarray, logits: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities and ranks of `tokens` [batch, time], each under the distribution before it:
    `next_logits` [vocab] for the first, `logits` [batch, time, vocab] (after each token) for the rest."""
    before = np.concatenate([np.broadcast_to(next_logits, (len(tokens), 1, next_logits.shape[-1])), logits[:, :-1]],
                            axis=1)  # [batch, time, vocab]
    chosen = np.take_along_axis(before, tokens[..., np.newaxis], axis=-1)  # [batch, time, 1]
    ranks = 1 + np.sum(before > chosen, axis=-1)
    peak = before.max(axis=-1, keepdims=True)
    log_normaliser = peak + np.log(np.sum(np.exp(before - peak), axis=-1, keepdims=True))
    return (chosen - log_normaliser)[..., 0].astype(np.float32), ranks


class Operations:
    def __init__(self, table: SessionTable, models: ModelRegistry, accepting: Callable[[], None],
                 find: Callable[[str, str], Awaitable[Session]], made: Callable[[Session], None]):
        self.table = table
        self.models = models
        self._accepting = accepting
        self._find = find  # the live session of an owner, woken from the session store if need be
        self._made = made  # told of each session a fork or an import makes, as of a created one

    @contextlib.asynccontextmanager
    async def _holding(self, session_id: str, owner: str, expected_position: int | None) -> AsyncIterator[Session]:
        """The live session, after its earlier work and with no step of it running until the block ends, at the
        expected position if one is given."""
        session = await self._find(session_id, owner)
        hold = await session.model.batcher.hold(session)
        try:
            session.ensure_live()
            session.check_position(expected_position)
            yield session
        finally:
            hold.release()

    @staticmethod
    def prediction(session: Session, top_k: int, temperature: float) -> Prediction | None:
        """What the session predicts now, from the logits it holds; None when it has read nothing."""
        if not session.has_prediction:
            return None
        model = session.model
        return model.batcher.predict(model.pool.arrays[NEXT_LOGITS][session.slot], top_k, temperature)

    # Fork and reset ----------------------------------------------------------------------------

    async def fork(self, session_id: str, owner: str, count: int, ttl: float | None,
                   expected_position: int | None) -> list[Session]:
        self._accepting()
        async with self._holding(session_id, owner, expected_position) as source:
            forks = self.table.fork(source, count, source.ttl if ttl is None else ttl)
        for fork in forks:
            self._made(fork)
        return forks

    async def reset(self, session_id: str, owner: str, expected_position: int | None) -> Session:
        self._accepting()
        async with self._holding(session_id, owner, expected_position) as session:
            base = session.initial_checkpoint
            session.model.pool.set_rows(session.slot, base.rows)
            session.history = self.table.new_history(base)
            session.move_to(0, time.monotonic())
            return session

    # Rewind ------------------------------------------------------------------------------------

    async def rewind(self, session_id: str, owner: str, tokens: int, expected_position: int | None, top_k: int,
                     temperature: float) -> tuple[Session, Prediction | None]:
        """Undo the session's last `tokens`: restore the checkpoint before them, replay the kept tokens up to there."""
        self._accepting()
        async with self._holding(session_id, owner, expected_position) as session:
            if tokens > session.rewindable:
                raise RewindBeyondDepth(session.id, tokens, session.rewindable, self.table.rewind_depth)
            target = session.position - tokens
            rows = await self._replay(session.model, session.history, target)
            session.model.pool.set_rows(session.slot, rows)
            session.history.truncate(target)
            session.move_to(target, time.monotonic())
            return session, self.prediction(session, top_k, temperature)

    @staticmethod
    async def _replay(model: ServedModel, history: History, position: int) -> Row | None:
        """The rows (state and next-token logits) at `position`, from a checkpoint and the tokens after it."""
        replay = history.replay_to(position)
        if not len(replay.tokens):
            return replay.start.rows
        batcher = model.batcher
        result = await batcher.evaluate(replay.tokens[np.newaxis], batcher.states_of(replay.start.rows))
        return batcher.rows_of(result)

    # Score and peek ----------------------------------------------------------------------------

    async def score(self, session_id: str, owner: str, continuations: list[np.ndarray],
                    expected_position: int | None) -> tuple[int, list[Scored]]:
        """Each continuation's scores from where the session is; candidates of one length share a model call."""
        self._accepting()
        async with self._holding(session_id, owner, expected_position) as session:
            if not session.has_prediction:
                raise InvalidArgument("continuations", NOTHING_READ)
            batcher, texts = session.model.batcher, session.model.bundle.vocab.tokens
            rows = session.model.pool.rows(session.slot)
            scored: dict[int, Scored] = {}
            for length in sorted({len(c) for c in continuations}):
                indices = [i for i, c in enumerate(continuations) if len(c) == length]
                tokens = np.stack([continuations[i] for i in indices])  # [batch, time]
                result = await batcher.evaluate(tokens, batcher.states_of(rows, len(indices)))
                logprobs, ranks = score_rows(rows[NEXT_LOGITS], result.logits, tokens)
                for row, i in enumerate(indices):
                    scored[i] = Scored(tokens[row], [texts[token] for token in tokens[row].tolist()], logprobs[row],
                                       ranks[row])
            return session.position, [scored[i] for i in range(len(continuations))]

    async def peek(self, session_id: str, owner: str, tokens: np.ndarray, top_k: int, temperature: float,
                   expected_position: int | None) -> StepAnswer:
        """What a step of `tokens` would answer, committing nothing."""
        self._accepting()
        async with self._holding(session_id, owner, expected_position) as session:
            batcher = session.model.batcher
            result = await batcher.evaluate(tokens[np.newaxis], batcher.states_of(session.model.pool.rows(session.slot)))
            return StepAnswer(session.position + len(tokens), batcher.predict(result.next_logits[0], top_k, temperature))

    # Export and import -------------------------------------------------------------------------

    async def export(self, session_id: str, owner: str, expected_position: int | None) -> tuple[Session, bytes]:
        async with self._holding(session_id, owner, expected_position) as session:
            return session, self.blob_of(session)

    @staticmethod
    def blob_of(session: Session) -> bytes:
        """The session as a portable blob: what ExportSession answers and the session store keeps."""
        history, model = session.history, session.model
        portable = PortableSession(
            session.position, model.pool.rows(session.slot), "" if session.initial is None else session.initial.name,
            None if session.initial is None else session.initial.rows,
            [] if history is None else list(history.checkpoints),
            [] if history is None else history.tokens)
        return encode(portable, model.identity, model.shapes)

    def decode(self, blob: bytes) -> tuple[ServedModel, PortableSession]:
        """The session in `blob` and the loaded version it was exported from, checked whole; refused with the reason
        when the blob is damaged or no version of that graph is loaded here."""
        exported = exported_model(blob)
        model = self.models.with_identity(exported)
        if model is None:
            loaded = ", ".join(model.identity.describe() for model in self.models.all() if not model.retiring)
            raise IncompatibleState(f"{FIELD}: the session was exported from {exported.describe()}, which this server "
                                    f"does not serve (it serves {loaded}): its state means nothing to another model")
        return model, decode(blob, model.identity, model.shapes, len(model.bundle.vocab))

    def import_(self, owner: str, model: ServedModel, portable: PortableSession, ttl: float, top_k: int,
                temperature: float) -> tuple[Session, Prediction | None]:
        """A new session of `owner` continuing the exported one (decoded by `decode`) on `model`."""
        self._accepting()
        session = self.table.create(owner, ttl, model)
        self.install(session, portable)
        session.move_to(portable.position, time.monotonic())
        self._made(session)
        return session, self.prediction(session, top_k, temperature)

    def install(self, session: Session, portable: PortableSession) -> None:
        """Give `session` (new in the table) the rows, initial state and history of `portable`; not its position."""
        session.model.pool.set_rows(session.slot, portable.rows)
        if portable.initial_rows is not None:
            session.initial = NamedState(portable.initial_state, IMPORTED, portable.initial_rows, None)
        if portable.checkpoints and self.table.rewind_depth:
            session.history = History(self.table.rewind_depth, self.table.rewind_checkpoint_every,
                                      portable.checkpoints, portable.tokens)
        else:
            session.history = self.table.new_history(Checkpoint(portable.position, portable.rows))

    # Named states ------------------------------------------------------------------------------

    async def register_state(self, model: ServedModel, owner: str, name: str, tokens: np.ndarray) -> NamedState:
        """Name the state after `tokens` for `owner` alone."""
        return model.states.register(owner, name, tokens, await self._state_after(model, tokens))

    async def register_shared_state(self, model: ServedModel, name: str, tokens: np.ndarray) -> NamedState:
        """Name the state after `tokens` for every caller (an Admin call)."""
        return model.states.register_shared(name, tokens, await self._state_after(model, tokens))

    async def _state_after(self, model: ServedModel, tokens: np.ndarray) -> Row:
        """The rows after reading `tokens` from zeros with `model`, in a call that commits nothing."""
        self._accepting()
        batcher = model.batcher
        return batcher.rows_of(await batcher.evaluate(tokens[np.newaxis], batcher.states_of(None)))
