"""The proxy's hot path: the two capture routes answered as bare ASGI, ahead of FastAPI's routing,
dependency injection and middleware, and forwarded upstream over one shared aiohttp session.

Per call the response path does: a cached kolm-key lookup, one parse of the request body (to refuse bad
requests and to know the model, the messages and the stream flag), the upstream round trip with the body
forwarded as the client sent it, and the reply passed back as bytes (chunk by chunk for streams). The
reply is never parsed here: it is kept as bytes and parsed, scrubbed, redacted and written by the
recorder, off this path.

The provider key (`x-upstream-api-key`) is forwarded and removed from every byte that goes back to the
client or on to the recorder; it is never logged. Upstream failures map to 502 (refused, cut off) or 504
(timed out); upstream answers, errors included, pass through with their status.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from typing import Any, Protocol

import aiohttp
from yarl import URL

from kolm_pipeline.capture.batch import REDACTED
from kolm_pipeline.capture.images import ImageError, check_images
from kolm_pipeline.capture.providers import Provider, RequestError
from kolm_pipeline.capture.recorder import Recorder
from kolm_pipeline.provenance import jsontext
from kolm_pipeline.settings import CaptureConfig, Settings
from kolm_pipeline.store import CaptureStore, Tenant, validate_namespace

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

CAPTURE_ID_HEADER = "x-kolm-capture-id"
_CAPTURE_ID_HEADER_BYTES = CAPTURE_ID_HEADER.encode()
# Who answered, where the namespace routes (`shadow`, `student`): `teacher`, or the adapter's CID.
SERVED_BY_HEADER = b"x-kolm-served-by"
_SERVED_BY_TEACHER = [(SERVED_BY_HEADER, b"teacher")]
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=20.0, sock_connect=10.0, sock_read=300.0)
_REDACTED_BYTES = REDACTED.encode("utf-8")
_FORWARDED_RESPONSE_HEADERS = frozenset({b"retry-after", b"x-request-id", b"request-id", b"openai-processing-ms"})
_FORWARDED_RESPONSE_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")
_JSON = b"application/json"
MAX_TAGS = 32
MAX_MODEL_LENGTH = 128
MAX_TAG_LENGTH = 64
_NEGATIVE_KEY_TTL_S = 2.0
_KEY_CACHE_MAX = 10_000


# Sends of one call when the upstream drops the connection before any reply (see `_forward`).
STALE_CONNECTION_ATTEMPTS = 2


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message"}}` with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


class _ClientGone(Exception):
    """The client hung up before its request body arrived: there is no one to answer."""


def error_body(type_: str, message: str) -> bytes:
    return json.dumps({"error": {"type": type_, "message": message}}).encode("utf-8")


def kolm_keys(headers: Mapping[str, str]) -> list[str]:
    """Candidates for the kolm key from the client's API-key slot: `Authorization: Bearer`, `x-api-key`
    (SDKs differ in which one carries `api_key`)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    candidates = [token.strip() if scheme.lower() == "bearer" else "", headers.get("x-api-key", "").strip()]
    return [key for key in candidates if key]


def parse_tags(header: str | None) -> list[str]:
    tags: list[str] = []
    for raw in (header or "").split(","):
        tag = raw.strip()
        if not tag or tag in tags:
            continue
        if len(tag) > MAX_TAG_LENGTH or not tag.isprintable():
            raise ApiError(
                400,
                "invalid_request_error",
                f"invalid tag in x-kolm-tags: at most {MAX_TAG_LENGTH} printable characters per tag",
            )
        tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise ApiError(400, "invalid_request_error", f"x-kolm-tags: at most {MAX_TAGS} tags")
    return tags


def parse_namespace(value: str | None) -> str:
    if not value:
        raise ApiError(400, "invalid_request_error", "missing x-kolm-namespace header")
    try:
        return validate_namespace(value)
    except ValueError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from exc


class KeyCache:
    """kolm key → tenant, reused for `ttl` seconds so the response path makes no database round trip.

    Entries are keyed by the key's sha256, never by the key itself; unknown keys are remembered briefly
    so a client hammering with a bad key does not hammer the database either."""

    def __init__(self, store: CaptureStore, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._entries: dict[bytes, tuple[Tenant | None, float]] = {}

    async def tenant(self, key: str) -> Tenant | None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[1] > now:
            return entry[0]
        try:
            tenant = await asyncio.to_thread(self._store.tenant_for_key, key)
        except Exception as exc:
            # The store is down: a key seen before keeps working (captures are spooled meanwhile).
            if entry is not None and entry[0] is not None:
                return entry[0]
            logger.warning("kolm key lookup failed: %s", type(exc).__name__)
            raise ApiError(503, "unavailable_error", "the capture store is unavailable; retry shortly") from exc
        if len(self._entries) >= _KEY_CACHE_MAX:
            self._entries.clear()
        self._entries[digest] = (
            tenant,
            now + (self._ttl if tenant is not None else min(self._ttl, _NEGATIVE_KEY_TTL_S)),
        )
        return tenant

    async def tenant_of(self, headers: Mapping[str, str]) -> Tenant:
        """The tenant whose kolm key the request carries; 401 when there is none or it is unknown."""
        return (await self.authenticate(headers))[0]

    async def authenticate(self, headers: Mapping[str, str]) -> tuple[Tenant, str]:
        """(the tenant, the hex sha256 of the key that named it); 401 when there is no known kolm key."""
        tenant, key = await self.tenant_and_key(headers)
        return tenant, hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    async def tenant_and_key(self, headers: Mapping[str, str]) -> tuple[Tenant, str]:
        """(the tenant, the kolm key that named it); 401 when there is no known kolm key."""
        keys = kolm_keys(headers)
        if not keys:
            raise ApiError(401, "authentication_error", "missing kolm key: send it as the client's API key")
        for key in keys:
            tenant = await self.tenant(key)
            if tenant is not None:
                return tenant, key
        raise ApiError(401, "authentication_error", "unknown kolm key")

    def clear(self) -> None:
        self._entries.clear()


class KeyFilter:
    """Removes the provider key from a byte stream even when it straddles two chunks: only a tail that
    could be the start of the key is held back, so ordinary chunks pass at once."""

    def __init__(self, secret: bytes) -> None:
        self._key = secret
        self._first = secret[:1]
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        if self._key in data:
            data = data.replace(self._key, _REDACTED_BYTES)
        keep = 0
        position = data.find(self._first, max(0, len(data) - len(self._key) + 1))
        while position != -1:
            if self._key.startswith(data[position:]):
                keep = len(data) - position
                break
            position = data.find(self._first, position + 1)
        if keep:
            self._held = data[-keep:]
            return data[:-keep]
        self._held = b""
        return data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


@functools.lru_cache(maxsize=1024)
def _spellings(secret: str) -> tuple[re.Pattern[bytes], bool]:
    """Every way JSON may spell the key: each character itself or as a `\\uXXXX` escape (hex digits in
    either case), `/` also as `\\/`, `"` and `\\` only escaped; and whether the key has such a character."""
    parts = []
    for char in secret:
        hex_digits = "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{ord(char):04x}")
        spellings = [r"\\u" + hex_digits]
        if char in '"\\':
            spellings.append(re.escape("\\" + char))
        else:
            spellings.append(re.escape(char))
            if char == "/":
                spellings.append(re.escape("\\/"))
        parts.append("(?:" + "|".join(spellings) + ")")
    return re.compile("".join(parts).encode("ascii")), any(char in '"\\/' for char in secret)


def scrub_secret(data: bytes, secret: str) -> bytes:
    """`data` (a JSON body or an event stream of JSON) with the provider key removed however it is spelt.
    Escapes are looked for only when the bytes hold one that could spell part of the key (a `\\u`, or any
    escape for a key with `"`, `\\` or `/`); then the plain key is a byte search. Escapes first: the plain
    spelling of a key ending in `\\` is also the start of its escaped spelling (`…\\u005c`), and replacing it
    first would leave the escape's tail behind."""
    if not secret:
        return data
    if b"\\" in data:
        pattern, escapable = _spellings(secret)
        if escapable or b"\\u" in data:
            data = pattern.sub(_REDACTED_BYTES, data)
    plain = secret.encode("ascii")
    if plain in data:
        data = data.replace(plain, _REDACTED_BYTES)
    return data


def _request_headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name; the first of repeated headers wins (as in Starlette)."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in headers:
            headers[key] = value.decode("latin-1")
    return headers


def _response_headers(raw: Any, secret: bytes) -> tuple[RawHeaders, bytes]:
    """The upstream headers a client may see (rate limits, retry-after, request ids), and the content type."""
    forwarded: RawHeaders = []
    content_type = b""
    for name, value in raw:
        lower = name.lower()
        if lower == b"content-type":
            content_type = value.replace(secret, _REDACTED_BYTES)
        elif lower in _FORWARDED_RESPONSE_HEADERS or lower.startswith(_FORWARDED_RESPONSE_PREFIXES):
            forwarded.append((lower, value.replace(secret, _REDACTED_BYTES)))
    return forwarded, content_type


async def respond(send: Send, status: int, body: bytes, content_type: bytes, headers: RawHeaders) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body)), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


_UUID7_MARKS = 0x7 << 76 | 0b10 << 62  # version 7, variant RFC 9562
_UUID7_RANDOM = ((1 << 76) - 1) & ~(0b11 << 62)  # the 74 bits below the version, less the variant's two
# The ids' own generator: seeded from the OS, again in a forked child, and out of reach of `random.seed`.
_id_random = random.Random()
os.register_at_fork(after_in_child=_id_random.seed)
_random_bits = _id_random.getrandbits


def new_request_id() -> str:
    """A capture's request id: a UUIDv7 (RFC 9562) in 32 hex digits, its first 48 bits the time in ms.

    Ids made later sort later, so the store's unique index on them grows at its end instead of touching a
    random page per capture.
    74 random bits keep ids made in the same millisecond apart. They come from a Mersenne Twister of the
    ids' own, seeded from the OS at start and again in a forked child: an id must be unique, not secret
    (another tenant's id answers 404 like one that does not exist), and `os.urandom` would be a system call
    per proxied call. The hex digits come from the id's 16 bytes, which is cheaper than a format spec."""
    return (time.time_ns() // 1_000_000 << 80 | _random_bits(76) & _UUID7_RANDOM | _UUID7_MARKS).to_bytes(16).hex()


class Call:
    """One proxied call: what is known from the request, and the single record it ends in. The record is
    handed over as raw bytes (request body, reply) and parsed later, by the recorder's writer."""

    __slots__ = (
        "recorder",
        "request_id",
        "provider",
        "tenant",
        "namespace",
        "model",
        "request",
        "tags",
        "secret",
        "streamed",
        "recorded",
        "start_ns",
        "served_by",
        "on_recorded",
        "routed",
        "kolm_key",
    )

    def __init__(
        self,
        recorder: Recorder | None,
        provider: Provider,
        tenant: str,
        namespace: str,
        model: str,
        request: bytes,
        tags: tuple[str, ...],
        secret: str,
        streamed: bool,
    ) -> None:
        self.recorder = recorder
        self.request_id = new_request_id() if recorder is not None else None
        self.provider = provider
        self.tenant = tenant
        self.namespace = namespace
        self.model = model
        self.request = request
        self.tags = tags
        self.secret = secret
        self.streamed = streamed
        self.recorded = False
        self.start_ns = time.perf_counter_ns()
        self.served_by: str | None = None  # the adapter CID, when the student answered
        # Student routing's hook: called once with (outcome, status, reply, latency µs) as the call is recorded.
        self.on_recorded: Callable[[str, int, bytes, int], None] | None = None
        self.routed = False  # the namespace routes (`shadow` or `student`): answers say who answered
        self.kolm_key = ""  # the key that named the tenant: the student is asked with it (never recorded)

    @property
    def id_header(self) -> RawHeaders:
        return [] if self.request_id is None else [(_CAPTURE_ID_HEADER_BYTES, self.request_id.encode())]

    @property
    def teacher_headers(self) -> RawHeaders:
        """The kolm headers of an answer the teacher gave: the capture id, and who answered where routed."""
        return self.id_header + _SERVED_BY_TEACHER if self.routed else self.id_header

    def record(self, outcome: str, http_status: int, reply: bytes = b"", end_ns: int | None = None) -> None:
        """Journal the capture once (`outcome`: failure, reply or stream), before the client's response
        completes; later calls are ignored. The provider key is removed from every field first: it never
        reaches the disk. The record is a plain tuple of `Pending`'s fields."""
        if self.recorded:
            return
        self.recorded = True
        secret = self.secret
        latency_us = ((end_ns or time.perf_counter_ns()) - self.start_ns) // 1000
        reply = scrub_secret(reply, secret)
        if self.on_recorded is not None:
            self.on_recorded(outcome, http_status, reply, latency_us)
        if self.recorder is None:
            return
        self.recorder.submit(
            (
                self.request_id,
                self.tenant,
                self.namespace,
                self.provider.name,
                self.model.replace(secret, REDACTED) if secret else self.model,
                scrub_secret(self.request, secret),
                tuple(tag.replace(secret, REDACTED) for tag in self.tags) if secret else self.tags,
                self.streamed,
                outcome,
                http_status,
                reply,
                latency_us,
                time.time(),
                self.served_by,
            )
        )


async def _read_body(receive: Receive, limit: int, declared: str | None) -> bytes:
    """The request body, refused with 413 past `limit` without reading further."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large", f"request body exceeds {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"request body exceeds {limit} bytes")
        if not message.get("more_body", False):
            if not parts:
                return chunk
            parts.append(chunk)
            return b"".join(parts)
        parts.append(chunk)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Route(Protocol):
    """A namespace's routing as the router last read it (`routing.router.NamespaceRoute`)."""

    mode: str


class Routing(Protocol):
    """Student routing (`routing.router.StudentRouter`): handed to the forwarder by the capture server, so
    this layer stays below the serving and evaluation code it uses."""

    def cached(self, tenant: str, namespace: str) -> Route | None: ...

    async def load(self, tenant: str, namespace: str) -> Route: ...

    async def answer(self, call: Call, body: dict, send: Send, route: Any) -> bool: ...


class Forwarder:
    """Answers `POST` on a provider's capture route; one per app, its session opened in the lifespan.
    With `routing`, a namespace whose `routing` switch is not `teacher` is routed by it first."""

    def __init__(self, settings: Settings, config: CaptureConfig, keys: KeyCache, recorder: Recorder | None,
                 routing: Routing | None = None) -> None:
        self._settings = settings
        self._config = config
        self._keys = keys
        self._recorder = recorder
        self._routing = routing
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def start(self) -> None:
        # No cookie jar: a shared session must never carry one tenant's upstream cookies into another's call.
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=UPSTREAM_TIMEOUT,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, provider: Provider) -> URL:
        url = self._urls.get(provider.name)
        if url is None:
            url = self._urls[provider.name] = URL(provider.upstream_url(self._settings))
        return url

    async def __call__(self, scope: Scope, receive: Receive, send: Send, provider: Provider) -> None:
        try:
            await self._proxy(scope, receive, send, provider)
        except ApiError as exc:
            await respond(send, exc.status, error_body(exc.type, exc.message), _JSON, [])
        except _ClientGone:
            return
        except Exception as exc:  # never a traceback: its text could hold a header value
            logger.error("unexpected error in the capture proxy: %s", type(exc).__name__)
            with suppress(Exception):  # fails harmlessly when the response had already started
                await respond(send, 500, error_body("internal_error", "internal server error"), _JSON, [])

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, provider: Provider) -> None:
        headers = _request_headers(scope)
        tenant, kolm_key = await self._keys.tenant_and_key(headers)
        namespace = parse_namespace(headers.get("x-kolm-namespace"))
        tags = parse_tags(headers.get("x-kolm-tags"))
        upstream_key = headers.get("x-upstream-api-key", "").strip()
        if not upstream_key:
            raise ApiError(401, "authentication_error", "missing x-upstream-api-key header (the provider key)")
        if not (upstream_key.isascii() and upstream_key.isprintable()):
            raise ApiError(400, "invalid_request_error", "x-upstream-api-key must be printable ASCII")
        raw = await _read_body(receive, self._config.max_body_bytes, headers.get("content-length"))
        try:
            body = jsontext.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "invalid_request_error", "request body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request_error", "request body must be a JSON object")
        problem = jsontext.unstorable(raw, body)
        if problem:  # refused alone, at the door, rather than failing the batch it would be written with
            raise ApiError(400, "invalid_request_error", f"request body holds {problem} (a \\u escape), which "
                                                         "cannot be recorded; send valid Unicode text")
        try:
            check_images(provider.messages(body))  # an inline image must be one: refused here, not stored
        except (RequestError, ImageError) as exc:
            raise ApiError(400, "invalid_request_error", str(exc)) from exc
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "invalid_request_error", "'model' must be a non-empty string")
        if len(model) > MAX_MODEL_LENGTH:  # the store's column holds 255, and redaction may lengthen it
            raise ApiError(400, "invalid_request_error", f"'model' is longer than {MAX_MODEL_LENGTH} characters")
        streamed = body.get("stream") is True
        recorder = self._recorder
        call = Call(recorder, provider, tenant.name, namespace, model, raw, tuple(tags), upstream_key, streamed)
        call.kolm_key = kolm_key
        if recorder is not None:
            recorder.begin()
        try:
            routing = self._routing
            if routing is not None:
                route = routing.cached(tenant.name, namespace) or await routing.load(tenant.name, namespace)
                if route.mode != "teacher" and await routing.answer(call, body, send, route):
                    return
            await self._forward(call, raw, headers, send, receive)
        finally:
            if recorder is not None and not call.recorded:
                recorder.abandon()

    async def _forward(self, call: Call, raw: bytes, headers: dict[str, str], send: Send, receive: Receive) -> None:
        assert self._session is not None, "forwarder not started"
        provider = call.provider
        secret = call.secret.encode("ascii")
        call.start_ns = time.perf_counter_ns()
        for attempt in range(1, STALE_CONNECTION_ATTEMPTS + 1):
            try:
                upstream = await self._session.post(
                    self._url(provider),
                    data=raw,
                    headers=provider.upstream_headers(headers, call.secret),
                    allow_redirects=False,
                )
                break
            except TimeoutError as exc:
                return await self._upstream_error(send, call, 504, exc)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A kept-alive connection the upstream closed as we sent on it (its idle timeout and our reuse
                # crossed): nothing was answered, so the call goes once more, as the provider SDKs do.
                if attempt == STALE_CONNECTION_ATTEMPTS:
                    return await self._upstream_error(send, call, 502, exc)
                logger.info("capture %s: upstream connection dropped before a reply (%s); sending again",
                            call.request_id, type(exc).__name__)
            except aiohttp.ClientError as exc:
                return await self._upstream_error(send, call, 502, exc)
        try:
            forwarded, content_type = _response_headers(upstream.raw_headers, secret)
            forwarded += call.teacher_headers
            status = upstream.status
            if call.streamed and 200 <= status < 300 and content_type.startswith(b"text/event-stream"):
                await self._relay(call, upstream, send, receive, status, content_type, forwarded, secret)
                return
            try:
                content = await upstream.read()
            except TimeoutError as exc:
                return await self._upstream_error(send, call, 504, exc)
            except aiohttp.ClientError as exc:
                return await self._upstream_error(send, call, 502, exc)
            call.record("reply", status, content)
            if secret in content:
                content = content.replace(secret, _REDACTED_BYTES)
            await respond(send, status, content, content_type or _JSON, forwarded)
        finally:
            upstream.release()

    async def _relay(
        self,
        call: Call,
        upstream: aiohttp.ClientResponse,
        send: Send,
        receive: Receive,
        status: int,
        content_type: bytes,
        headers: RawHeaders,
        secret: bytes,
    ) -> None:
        """Pass the stream through chunk by chunk; however it ends (done, upstream cut off, client gone) the
        chunks read so far are recorded. A client that hangs up closes the upstream connection."""
        chunks: list[bytes] = []
        last_chunk_ns: int | None = None
        keys = KeyFilter(secret)
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(lambda done: done.cancelled() or upstream.close())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache"), *headers],
                }
            )
            try:
                async for chunk in upstream.content.iter_any():
                    last_chunk_ns = time.perf_counter_ns()
                    chunks.append(chunk)
                    out = keys.feed(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not watcher.done():
                    logger.warning("upstream stream of capture %s broke off: %s", call.request_id, type(exc).__name__)
            watcher.cancel()
            # Journaled before the response ends: a client that saw the whole stream end has a stored capture.
            call.record("stream", status, b"".join(chunks), last_chunk_ns)
            await send({"type": "http.response.body", "body": keys.flush(), "more_body": False})
        finally:
            watcher.cancel()
            call.record("stream", status, b"".join(chunks), last_chunk_ns)

    async def _upstream_error(self, send: Send, call: Call, status: int, exc: Exception) -> None:
        call.record("failure", status)
        what = "timed out" if status == 504 else "unreachable or broke off"
        message = f"{call.provider.name} upstream {what} ({type(exc).__name__})"
        await respond(send, status, error_body("upstream_error", message), _JSON, call.id_header)
