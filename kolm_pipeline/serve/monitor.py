"""Live monitoring of the adapters in service, and automatic rollback when one does worse than evaluated.

After an adapter starts serving a task, its answers are observed two ways:

* a **format check** on a sampled share of responses (chosen by a hash of the response id, so the same
  id is always in or out of the sample): the task's verifier run without a reference, keeping only its
  in-format verdict — a valid label (``closed_vocab``), JSON that parses and validates against the
  task's schema (``json_schema``), text that occurs in the prompt (``byte_grounded``), non-empty text
  (``text_match``). That is exactly the coverage V of the K-score, so its baseline is the coverage the
  adapter's evaluation measured.
* **explicit feedback** on a served response (``POST /v1/feedback``): good or bad. That judges
  correctness, so its baseline is the evaluated accuracy A.

Each observed response is judged once: by its feedback when there is some, else by its format check.
Over the last ``window`` judged responses,

    live score     = share judged good
    evaluated score = mean of the baselines of those same responses (V for format-judged, A for rated)

and when at least ``min_requests`` responses are judged and ``live < evaluated − tolerance`` the monitor
trips: once per activation of a CID. A trip rolls the task back to the previous CID through the registry
(actor ``live-monitor``, the numbers in the registry row), unless the pointer has moved on already or the
previous CID was itself condemned by the live monitor; either way an alert is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kolm_pipeline.evaluate.alerts import send_alert
from kolm_pipeline.evaluate.verifiers import VERIFIERS
from kolm_pipeline.provenance.errors import UserError

# How a served answer was cut short (``LiveMonitor.observe``): out of the task's own room, or to the client's
# max_tokens.
Cut = Literal["room", "client"]

log = logging.getLogger("kolm.monitor")

# The verifiers compare with a reference answer, which live traffic lacks; the format verdict they
# return does not depend on it. "null" is valid JSON, which the json_schema verifier parses.
_NO_REFERENCE = "null"
_HISTORY_PER_TASK = 4


class MonitorConfigError(UserError, ValueError):
    """A monitoring setting is out of range; the message names it."""


@dataclass(frozen=True)
class MonitorConfig:
    """How the live monitor samples and when it trips (``kolm serve --monitor-*``)."""

    enabled: bool = True
    sample_share: float = 0.2
    tolerance: float = 0.10
    min_requests: int = 50
    window: int = 1000
    remember_responses: int = 10_000
    remember_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_share <= 1.0:
            raise MonitorConfigError(f"monitor sample share must be from 0 to 1, got {self.sample_share}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise MonitorConfigError(f"monitor tolerance must be from 0 to 1, got {self.tolerance}")
        if self.min_requests < 1:
            raise MonitorConfigError(f"monitor min requests must be at least 1, got {self.min_requests}")
        if self.window < self.min_requests:
            raise MonitorConfigError(f"monitor window ({self.window}) must hold at least min requests "
                                     f"({self.min_requests})")
        if self.remember_responses < 1 or self.remember_seconds <= 0:
            raise MonitorConfigError("the monitor must remember at least one response for a positive time")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Profile:
    """What the monitor needs to know about one artifact: how to check a response, what it scored."""

    verifier: str | None
    labels: list[str] | None = None
    json_schema: dict | None = None
    evaluated_accuracy: float | None = None
    evaluated_coverage: float | None = None

    @classmethod
    def from_artifact(cls, manifest: dict, evals: dict | None = None) -> Profile:
        """From the manifest (verifier, labels, evals block) and evals.json (the recipe spec's schema)."""
        evals_block = manifest.get("evals") if isinstance(manifest.get("evals"), dict) else {}
        candidate = evals_block.get("candidate") if isinstance(evals_block.get("candidate"), dict) else {}
        spec = (evals or {}).get("recipe_spec") if isinstance((evals or {}).get("recipe_spec"), dict) else {}
        schema = manifest.get("json_schema", spec.get("json_schema"))
        verifier = manifest.get("verifier")
        labels = manifest.get("labels")
        return cls(
            verifier=verifier if verifier in VERIFIERS else None,
            labels=list(labels) if isinstance(labels, list) else None,
            json_schema=schema if isinstance(schema, dict) else None,
            evaluated_accuracy=_number(candidate.get("accuracy")),
            evaluated_coverage=_number(candidate.get("coverage")),
        )

    def in_format(self, messages: list[dict], text: str) -> bool | None:
        """The verifier's reference-free verdict on one response, or None when the task names no verifier.

        A ``json_schema`` task whose artifact carries no schema is checked for parsing JSON only."""
        if self.verifier is None:
            return None
        source = "\n".join(str(message.get("content", "")) for message in messages)
        _, ok = VERIFIERS[self.verifier](text, _NO_REFERENCE, labels=self.labels or [],
                                         schema=self.json_schema or {}, source=source)
        return ok


def sampled(response_id: str, share: float) -> bool:
    """Whether a response is in the format-check sample: a fixed hash of its id, so tests and replicas agree."""
    if share >= 1.0:
        return True
    digest = hashlib.sha256(response_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass(eq=False)
class _Response:
    """One served response the monitor remembers, so feedback on it lands on the CID that answered."""

    session: _Session = field(repr=False)
    served_at: float
    format_ok: bool | None = None
    feedback: bool | None = None
    in_window: bool = False
    # A digest of the kolm key the response was served to: only that key's feedback counts for it.
    owner: str = ""

    def verdict(self) -> tuple[bool, float] | None:
        """(judged good, the evaluated baseline it is compared with), or None if it is not judged."""
        profile = self.session.profile
        if self.feedback is not None and profile.evaluated_accuracy is not None:
            return self.feedback, profile.evaluated_accuracy
        if self.format_ok is not None and profile.evaluated_coverage is not None:
            return self.format_ok, profile.evaluated_coverage
        return None


@dataclass(frozen=True)
class Trip:
    """Why the monitor tripped for one CID: the numbers the registry row and the alert carry."""

    task: str
    cid: str
    live_score: float
    evaluated_score: float
    tolerance: float
    observed: int
    counts: dict[str, int]

    @property
    def reason(self) -> str:
        return (f"live score {self.live_score:.3f} over {self.observed} judged responses is below the evaluated "
                f"score {self.evaluated_score:.3f} by more than the tolerance {self.tolerance:.2f}")

    def details(self) -> dict[str, Any]:
        return {"cid": self.cid, "live_score": round(self.live_score, 4),
                "evaluated_score": round(self.evaluated_score, 4), "tolerance": self.tolerance,
                "observed": self.observed, "counts": dict(self.counts)}


@dataclass(eq=False)
class _Session:
    """The monitoring of one CID from its activation on a task until it is replaced."""

    task: str
    cid: str
    profile: Profile
    window_size: int
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    window: deque[_Response] = field(default_factory=deque, repr=False)
    good: float = 0.0
    expected: float = 0.0
    judged: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {
        "served": 0, "format_checked": 0, "format_failed": 0, "feedback_good": 0, "feedback_bad": 0})
    trip: Trip | None = None
    outcome: str | None = None

    def _add(self, response: _Response) -> None:
        verdict = response.verdict()
        if verdict is None:
            return
        good, baseline = verdict
        response.in_window = True
        self.window.append(response)
        self.good += good
        self.expected += baseline
        self.judged += 1
        while len(self.window) > self.window_size:
            self._remove(self.window.popleft())

    def _remove(self, response: _Response) -> None:
        verdict = response.verdict()
        if not response.in_window or verdict is None:
            return
        good, baseline = verdict
        response.in_window = False
        self.good -= good
        self.expected -= baseline

    def rate(self, response: _Response, good: bool) -> None:
        """A person's verdict on a response replaces its format verdict (or an earlier rating); the response
        counts again as the newest judgement of the window."""
        previous = response.feedback
        if previous is not None:
            self.counts["feedback_good" if previous else "feedback_bad"] -= 1
        self.counts["feedback_good" if good else "feedback_bad"] += 1
        if response.in_window:
            self._remove(response)
            self.window.remove(response)
        response.feedback = good
        self._add(response)

    @property
    def live_score(self) -> float | None:
        return self.good / len(self.window) if self.window else None

    @property
    def evaluated_score(self) -> float | None:
        return self.expected / len(self.window) if self.window else None

    def summary(self) -> dict[str, Any]:
        profile = self.profile
        baseline_missing = [name for name, value in (("accuracy", profile.evaluated_accuracy),
                                                     ("coverage", profile.evaluated_coverage)) if value is None]
        live, expected = self.live_score, self.evaluated_score
        return {
            "cid": self.cid, "verifier": profile.verifier,
            "state": "tripped" if self.trip else ("replaced" if self.ended_at else "watching"),
            "live_score": None if live is None else round(live, 4),
            "evaluated_score": None if expected is None else round(expected, 4),
            "evaluated": {"accuracy": profile.evaluated_accuracy, "coverage": profile.evaluated_coverage},
            "not_judged_for_lack_of": baseline_missing,
            "window": len(self.window), "judgements_since_activation": self.judged, **self.counts,
            "started_at": self.started_at, "ended_at": self.ended_at,
            "trip": self.trip.details() if self.trip else None, "outcome": self.outcome,
        }


class LiveMonitor:
    """Per task, the CID serving now and how its live answers compare with its evaluation.

    ``on_trip`` runs in a thread of its own (a rollback writes to the registry and MLflow, which takes
    seconds) and returns a one-line outcome for the status.
    """

    def __init__(self, config: MonitorConfig, on_trip: Callable[[Trip], str]) -> None:
        self.config = config
        self.on_trip = on_trip
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._history: dict[str, deque[_Session]] = {}
        self._responses: OrderedDict[str, _Response] = OrderedDict()
        self._actions: list[threading.Thread] = []

    def activate(self, task: str, cid: str, profile: Profile) -> None:
        """``cid`` serves ``task`` from now on: start a fresh session (counts start at zero)."""
        with self._lock:
            current = self._sessions.get(task)
            if current is not None and current.cid == cid:
                return
            self._end(task)
            self._sessions[task] = _Session(task=task, cid=cid, profile=profile, window_size=self.config.window)

    def deactivate(self, task: str) -> None:
        """The task has no adapter any more."""
        with self._lock:
            self._end(task)

    def _end(self, task: str) -> None:
        session = self._sessions.pop(task, None)
        if session is not None:
            session.ended_at = time.time()
            self._history.setdefault(task, deque(maxlen=_HISTORY_PER_TASK)).append(session)

    def _session_of(self, task: str, cid: str) -> _Session | None:
        current = self._sessions.get(task)
        if current is not None and current.cid == cid:
            return current
        return next((s for s in reversed(self._history.get(task, ())) if s.cid == cid), None)

    def _forget_old(self, now: float) -> None:
        while self._responses:
            oldest = next(iter(self._responses.values()))
            if len(self._responses) <= self.config.remember_responses \
                    and now - oldest.served_at <= self.config.remember_seconds:
                break
            self._responses.popitem(last=False)

    def observe(self, task: str, cid: str, response_id: str, messages: list[dict], text: str,
                owner: str = "", cut: Cut | None = None) -> None:
        """A response ``cid`` served to ``owner`` (a digest of the caller's key): remember it for feedback, and
        format-check it if it is sampled. ``cut`` says how it was cut short: ``"room"``, out of the room the task's
        evaluation gave an answer (a request that named no ``max_tokens``, ``finish_reason: "length"``), is out of
        format even when it parses — a JSON answer about to run out closes its object early
        (``evaluate/structured.py``), and the evaluated adapter's answers fit that room; ``"client"``, to the
        ``max_tokens`` the request named, is not format-checked at all (a client's limit says nothing of the
        adapter, and would otherwise let a client trip a rollback)."""
        with self._lock:
            session = self._session_of(task, cid)
            profile = session.profile if session is not None else None
        if session is None:
            return  # an adapter the monitor never saw activated (served before the monitor started)
        format_ok = None
        if cut != "client" and sampled(response_id, self.config.sample_share):
            format_ok = cut != "room" and profile.in_format(messages, text)
        now = time.time()
        with self._lock:
            response = _Response(session=session, served_at=now, format_ok=format_ok, owner=owner)
            session.counts["served"] += 1
            if format_ok is not None:
                session.counts["format_checked"] += 1
                session.counts["format_failed"] += not format_ok
            session._add(response)
            self._responses[response_id] = response
            self._forget_old(now)
            self._check(session)

    def feedback(self, response_id: str, good: bool, owner: str = "") -> dict[str, Any]:
        """Record a verdict on a served response by the key it was served to; KeyError if the id is unknown,
        forgotten or was served to another key (a caller cannot tell which).

        One verdict per response: a second one replaces the first."""
        with self._lock:
            self._forget_old(time.time())
            response = self._responses.get(response_id)
            if response is None or not hmac.compare_digest(response.owner, owner):
                raise KeyError(response_id)
            session = response.session
            session.rate(response, good)
            self._check(session)
            return {"task": session.task, "cid": session.cid, "session": session.summary()}

    def _check(self, session: _Session) -> None:
        """Trip once when the live score falls below the evaluated one; called holding the lock."""
        if session.trip is not None or session.ended_at is not None or len(session.window) < self.config.min_requests:
            return
        live, expected = session.live_score, session.evaluated_score
        if live is None or expected is None or live >= expected - self.config.tolerance:
            return
        session.trip = Trip(task=session.task, cid=session.cid, live_score=live, evaluated_score=expected,
                            tolerance=self.config.tolerance, observed=len(session.window), counts=dict(session.counts))
        log.error("live monitor tripped for %s on %s: %s", session.task, session.cid, session.trip.reason)
        action = threading.Thread(target=self._act, args=(session,), name=f"kolm-live-rollback-{session.task}",
                                  daemon=True)
        self._actions = [thread for thread in self._actions if thread.is_alive()] + [action]
        action.start()

    def _act(self, session: _Session) -> None:
        try:
            outcome = self.on_trip(session.trip)
        except Exception as exc:  # noqa: BLE001 - the outcome is reported in the status instead
            log.exception("live monitor action for %s failed", session.task)
            outcome = f"action failed: {type(exc).__name__}: {exc}"
        with self._lock:
            session.outcome = outcome

    def wait(self, timeout: float = 60.0) -> None:
        """Let running rollbacks finish (the runtime calls this before it stops)."""
        for thread in list(self._actions):
            thread.join(timeout)

    def status(self, visible: Callable[[str], bool] = lambda task: True) -> dict[str, Any]:
        """Each task's live session and earlier ones; only the tasks `visible` admits."""
        with self._lock:
            tasks = sorted(task for task in set(self._sessions) | set(self._history) if visible(task))
            return {
                "config": {"sample_share": self.config.sample_share, "tolerance": self.config.tolerance,
                           "min_requests": self.config.min_requests, "window": self.config.window},
                "tasks": {task: {
                    "active": self._sessions[task].summary() if task in self._sessions else None,
                    "previous": [s.summary() for s in reversed(self._history.get(task, ()))],
                } for task in tasks},
            }


def roll_back_on_trip(settings, trip: Trip) -> str:
    """The monitor's action: roll the task back to its previous CID, record why, alert; returns the outcome.

    Nothing is rolled back when the pointer no longer names the condemned CID (another replica, or an
    operator, moved it first: no row, no alert), or when the previous CID was itself condemned by the live
    monitor (then an ``alert`` row and an alert say that an operator must choose a version).
    """
    from kolm_pipeline.provenance.errors import DeployRefused, RegistryError
    from kolm_pipeline.registry.manage import LIVE_MONITOR_ACTOR, PointerMoved, rollback
    from kolm_pipeline.store import CaptureStore

    store = CaptureStore(settings.store_url)
    details = {"reason": trip.reason, "live_monitor": trip.details()}
    try:
        activation = rollback(settings, store, trip.task, actor=LIVE_MONITOR_ACTOR, details=details,
                              expected_cid=trip.cid, refuse_condemned=True)
    except PointerMoved as exc:
        log.info("live monitor: %s", exc)
        return f"not rolled back: {exc}"
    except (DeployRefused, RegistryError) as exc:
        row = store.add_registry_row(task=trip.task, from_cid=trip.cid, to_cid=None, k_before=None, k_after=None,
                                     decision="alert", actor=LIVE_MONITOR_ACTOR,
                                     details={**details, "reason": f"{trip.reason}; not rolled back: {exc}"})
        delivery = send_alert(settings.alert_webhook, live_regression_alert(trip, rolled_back_to=None,
                                                                            registry_row=row, outcome=str(exc)))
        return f"not rolled back: {exc} (registry row {row}; alert {delivery})"
    try:
        routing = _stop_student_routing(store, trip.task)
    except Exception as exc:  # noqa: BLE001 - the rollback happened: the alert must still go out, saying this
        routing = f"; routing not returned to shadow ({type(exc).__name__}): set it with kolm capture status"
    delivery = send_alert(settings.alert_webhook, live_regression_alert(
        trip, rolled_back_to=activation.to_cid, registry_row=activation.registry_row,
        outcome=f"rolled back to {activation.to_cid}{routing}"))
    return f"rolled back {trip.cid} → {activation.to_cid} (registry row {activation.registry_row}; alert {delivery})"


def _stop_student_routing(store, task: str) -> str:
    """After a rollback, a namespace the student answered goes back to `shadow`: the adapter it now serves has
    to earn its threshold again (to `teacher` when nothing is deployed any more). Returns what was done."""
    from kolm_pipeline.provenance.errors import InvalidInput
    from kolm_pipeline.registry.manage import LIVE_MONITOR_ACTOR
    from kolm_pipeline.store import split_partition_key

    try:
        tenant, namespace = split_partition_key(task)
    except InvalidInput:  # a task that is no namespace of the capture proxy
        return ""
    if store.namespace_settings(tenant, namespace).routing != "student":
        return ""
    try:
        store.set_switches(tenant, namespace, LIVE_MONITOR_ACTOR, routing="shadow")
        return "; routing student → shadow"
    except InvalidInput:
        store.set_switches(tenant, namespace, LIVE_MONITOR_ACTOR, routing="teacher")
        return "; routing student → teacher"


def live_regression_alert(trip: Trip, *, rolled_back_to: str | None, registry_row: int | None,
                          outcome: str) -> dict:
    """The alert body: which adapter did worse live than evaluated, by how much, and what was done."""
    return {
        "kind": "kolm.live_regression",
        "task": trip.task,
        "reason": trip.reason,
        "adapter_cid": trip.cid,
        "live_score": round(trip.live_score, 4),
        "evaluated_score": round(trip.evaluated_score, 4),
        "tolerance": trip.tolerance,
        "observed": trip.observed,
        "counts": dict(trip.counts),
        "action": "rollback" if rolled_back_to else "none",
        "rolled_back_to": rolled_back_to,
        "registry_row": registry_row,
        "outcome": outcome,
    }
