"""A loaded adapter and a request's hold on it: the runtime never unloads an adapter while a lease is open."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kolm_pipeline.serve.monitor import Profile


@dataclass
class LoadedAdapter:
    task: str
    cid: str
    name: str
    labels: list[str] | None
    loaded_at: float
    # The JSON Schema every answer is held to (a ``json_schema`` task: the recipe's schema from the manifest).
    json_schema: dict | None = None
    # Room for an answer when a request names no max_tokens: what its evaluation allowed (the manifest's
    # ``max_new_tokens``), or the server's default for artifacts made before manifests carried it.
    max_new_tokens: int | None = None
    # The tenant whose signed artifact this is: only that tenant's kolm keys see and call it.
    tenant: str = ""
    in_flight: int = 0
    retired_at: float | None = None
    profile: Profile = field(default_factory=lambda: Profile(verifier=None))


class Lease:
    """One request's hold on an adapter: while any lease is open the adapter is not unloaded.

    ``release`` is idempotent, so a request can release on every exit path (and on garbage collection of a
    stream the client abandoned before it started) without miscounting.
    """

    def __init__(self, adapter: LoadedAdapter, state: threading.Lock) -> None:
        self.adapter = adapter
        self._state = state
        self._released = False

    @property
    def task(self) -> str:
        return self.adapter.task

    @property
    def cid(self) -> str:
        return self.adapter.cid

    @property
    def name(self) -> str:
        return self.adapter.name

    @property
    def labels(self) -> list[str] | None:
        return self.adapter.labels

    @property
    def json_schema(self) -> dict | None:
        return self.adapter.json_schema

    @property
    def max_new_tokens(self) -> int | None:
        return self.adapter.max_new_tokens

    def release(self) -> None:
        with self._state:
            if not self._released:
                self._released = True
                self.adapter.in_flight -= 1
