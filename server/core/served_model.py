"""One loaded version of a model: its runtime, state pool, batcher, prefix-state cache and named states.

A session's rows mean something only to the graph that made them, so every session belongs to
one ServedModel for its whole life, and each version has a pool and a batcher of its own: a new
version serves new sessions while an old one finishes the sessions it began with. A retiring
version takes no new sessions and is handed to `on_drained` once its last session has ended.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from collections import Counter
from dataclasses import dataclass, field

from rnnserve.bundle import Bundle
from rnnserve.initial_states import load_initial_states
from rnnserve.server.core.batcher import Batcher
from rnnserve.server.core.named_states import NamedStates, shipped_state
from rnnserve.server.core.prefix_cache import PrefixCache
from rnnserve.server.metrics import Metrics, ModelMetrics
from rnnserve.server.model.runtime import Runtime
from rnnserve.server.model.state_pool import StatePool
from rnnserve.server.settings import Settings
from rnnserve.server.store.snapshot import ModelIdentity


@dataclass(eq=False)
class ServedModel:
    bundle: Bundle
    pool: StatePool
    batcher: Batcher
    cache: PrefixCache
    states: NamedStates
    events: ModelMetrics | None  # None with metrics off
    sessions: int = 0  # held now, in the session table
    sessions_by_owner: Counter[str] = field(default_factory=Counter)  # the same, by identity
    retiring: bool = False  # no new sessions; unloads once `sessions` reaches 0
    on_drained: Callable[[ServedModel], None] | None = None
    _batching: asyncio.Task | None = None

    @classmethod
    def load(cls, bundle: Bundle, settings: Settings, metrics: Metrics | None) -> ServedModel:
        """Everything `bundle` needs to serve: an onnxruntime session, an empty pool, a batcher (not yet running)."""
        events = None if metrics is None else metrics.model(bundle)
        runtime = Runtime(bundle, settings.ort_threads, settings.ort_spins)
        pool = StatePool(Batcher.pool_rows(runtime), settings.max_sessions, Batcher.pool_dtypes(runtime))
        batcher = Batcher(runtime, pool, max_batch_size=settings.max_batch_size,
                          max_batch_tokens=settings.max_batch_tokens,
                          max_queue_delay_seconds=settings.max_queue_delay_us / 1e6,
                          adaptive_wait_seconds=settings.adaptive_wait_us / 1e6,
                          adaptive_gap_seconds=settings.adaptive_gap_us / 1e6,
                          loop_max_tokens=settings.loop_max_tokens,
                          on_batch=None if events is None else events.record_batch)
        cache = PrefixCache(max_entries=settings.prefix_cache_entries, max_bytes=settings.prefix_cache_bytes,
                            min_tokens=settings.prefix_cache_min_tokens, row_bytes=pool.row_bytes,
                            scope=settings.prefix_cache_scope, max_partitions=settings.prefix_cache_identities,
                            idle_seconds=settings.prefix_cache_idle_seconds, events=events)
        states = NamedStates(cache, [shipped_state(state, bundle) for state in load_initial_states(bundle)],
                             settings.max_states_per_identity)
        model = cls(bundle, pool, batcher, cache, states, events)
        if events is not None:
            events.watch_sessions(lambda: model.sessions, pool.row_bytes)
            events.watch_prefix_cache(lambda: len(cache), lambda: cache.bytes)
        return model

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @functools.cached_property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.of(self.bundle)

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The rows of one session, by name: what exported blobs and snapshots carry."""
        return {name: array.shape[1:] for name, array in self.pool.arrays.items()}

    def describe(self) -> str:
        return f"{self.name} version {self.version}"

    # Lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._batching = asyncio.create_task(self.batcher.run(), name=f"rnnserve-batcher {self.describe()}")

    async def stop(self) -> None:
        """Stop batching: its model thread ends with the work it has."""
        if self._batching is not None:
            self._batching.cancel()
            await asyncio.gather(self._batching, return_exceptions=True)

    def unloaded(self) -> None:
        """Its last trace in the process: its metric series (the arrays go with the last reference)."""
        if self.events is not None:
            self.events.forget()

    def joined(self, owner: str) -> None:
        """A session of `owner` on this version entered the session table."""
        self.sessions += 1
        self.sessions_by_owner[owner] += 1

    def left(self, owner: str) -> None:
        """A session of `owner` on this version left the session table; the last one of a retiring version unloads
        it."""
        self.sessions -= 1
        self.sessions_by_owner[owner] -= 1
        if not self.sessions_by_owner[owner]:
            del self.sessions_by_owner[owner]
        if self.retiring and not self.sessions and self.on_drained is not None:
            self.on_drained(self)
