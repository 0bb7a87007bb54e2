"""Talking to model backends over OpenAI-compatible HTTP.

One pooled aiohttp session for every backend (it costs far less CPU per call
than httpx, which matters on the hot path). A model may list several backends:
calls rotate over them, a backend that refuses connections is skipped for a
moment, and a call moves to the next backend only while nothing has been
received, never once output has started.
"""
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp

from common import catalog, errors

log = logging.getLogger(__name__)


# A whole non-streamed answer larger than this is refused (a 16,384-token answer with
# n=8 and logprobs is a few MB).
ANSWER_BYTES_MAX = 64 * 1024 * 1024


class BackendFailed(Exception):
    """No backend could serve the call before any output."""


class CallExpired(Exception):
    """A streamed call reached its deadline (the router's maximum call duration, or the end of
    a hold it could not renew): the backend's stream is closed."""


class Backends:
    def __init__(self, *, connect_timeout_s: float, idle_timeout_s: float, total_timeout_s: float,
                 max_connections: int, down_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s
        self.max_connections = max_connections
        self.down_s = down_s
        self.session: aiohttp.ClientSession | None = None
        self._turn: dict[str, itertools.count] = {}
        self._down_until: dict[str, float] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections,
                                         keepalive_timeout=30, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, json_serialize=json.dumps,
                                             auto_decompress=True)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def order(self, model: catalog.Model) -> list[catalog.Backend]:
        """Backends to try, starting with the next in turn, ones marked down last."""
        backends = list(model.backends)
        if len(backends) > 1:
            start = next(self._turn.setdefault(model.id, itertools.count())) % len(backends)
            backends = backends[start:] + backends[:start]
            now = time.monotonic()
            backends.sort(key=lambda b: self._down_until.get(b.url, 0) > now)
        return backends

    def _headers(self, backend: catalog.Backend, request_id: str, json_body: bool = True) -> dict[str, str]:
        headers = {"content-type": "application/json"} if json_body else {}
        if backend.api_key:
            headers["authorization"] = f"Bearer {backend.api_key}"
        if request_id:
            headers["x-request-id"] = request_id
        return headers

    def _timeout(self, streaming: bool) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None if streaming else self.total_timeout_s,
                                     sock_connect=self.connect_timeout_s, sock_read=self.idle_timeout_s)

    async def _open(self, model: catalog.Model, path: str, body: dict, request_id: str, streaming: bool,
                    form: Callable[[catalog.Backend], aiohttp.FormData] | None = None):
        """POSTs to the first backend that answers; returns (backend, response).
        `form` makes a multipart body per backend (one can be sent only once) instead of JSON."""
        last = "no backend configured"
        for backend in self.order(model):
            if form is None:
                send = {"json": dict(body, model=backend.model), "headers": self._headers(backend, request_id)}
            else:
                send = {"data": form(backend), "headers": self._headers(backend, request_id, json_body=False)}
            try:
                response = await self.session.post(backend.url + path, timeout=self._timeout(streaming), **send)
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                self._down_until[backend.url] = time.monotonic() + self.down_s
                last = f"{backend.url}: {type(error).__name__}"
                log.warning("backend unreachable, trying the next", extra={"backend": backend.url,
                                                                          "error": str(error)})
                continue
            if response.status >= 500 or response.status == 429:
                text = await response.text()
                response.release()
                last = f"{backend.url}: HTTP {response.status}"
                log.warning("backend failed, trying the next", extra={"backend": backend.url,
                                                                      "status": response.status, "body": text[:300]})
                continue
            if response.status != 200:
                await _client_error(response)
            return backend, response
        raise BackendFailed(last)

    async def complete(self, model: catalog.Model, path: str, body: dict,
                       request_id: str) -> tuple[catalog.Backend, dict]:
        """A non-streamed call: the backend that answered, and its answer (a JSON object)."""
        backend, response = await self._open(model, path, body, request_id, streaming=False)
        async with response:
            data = bytearray()
            try:
                async for chunk in response.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > ANSWER_BYTES_MAX:
                        raise BackendFailed(f"{backend.url}: an answer over {ANSWER_BYTES_MAX} bytes")
                answer = json.loads(data)
            except (ValueError, aiohttp.ClientPayloadError) as error:
                raise BackendFailed(f"malformed answer from the backend: {error}") from None
        if not isinstance(answer, dict):
            raise BackendFailed("malformed answer from the backend: not a JSON object")
        return backend, answer

    async def stream(self, model: catalog.Model, path: str, body: dict, request_id: str,
                     deadline: Callable[[], float] | None = None) -> tuple[catalog.Backend, AsyncIterator[dict]]:
        """Opens a streamed call; returns the backend and its events (parsed SSE data). Past
        `deadline()` (time.monotonic()), checked on every line the backend sends, the events
        end with CallExpired; a backend that sends nothing at all trips the idle timeout."""
        backend, response = await self._open(model, path, body, request_id, streaming=True)
        return backend, _events(response, deadline)

    async def post(self, model: catalog.Model, path: str, request_id: str, *, body: dict | None = None,
                   form: Callable[[catalog.Backend], aiohttp.FormData] | None = None
                   ) -> tuple[catalog.Backend, aiohttp.ClientResponse]:
        """A media call: the first backend's 200 response, unread (the caller reads or streams it
        and releases it). Moves on to the next backend only while nothing was received."""
        return await self._open(model, path, body or {}, request_id, streaming=True, form=form)

    async def get(self, backend: catalog.Backend, path: str, request_id: str,
                  timeout_s: float | None = None) -> aiohttp.ClientResponse:
        """A GET to one given backend (a video job lives where it was made); the response
        unread, whatever its status below 500. BackendFailed when it cannot answer.
        `timeout_s` bounds the whole call; without it only connecting and each read are."""
        timeout = self._timeout(streaming=True)
        if timeout_s is not None:
            timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_timeout_s)
        try:
            response = await self.session.get(backend.url + path, headers=self._headers(backend, request_id, False),
                                              timeout=timeout)
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            raise BackendFailed(f"{backend.url}: {type(error).__name__}") from None
        if response.status >= 500:
            response.release()
            raise BackendFailed(f"{backend.url}: HTTP {response.status}")
        return response


async def _client_error(response: aiohttp.ClientResponse) -> None:
    """A 4xx from the backend is about the request: pass its message on as a 400."""
    try:
        payload = await response.json(content_type=None)
        message = payload["error"]["message"]
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        message = (await response.text())[:500] or f"HTTP {response.status}"
    finally:
        response.release()
    raise errors.InvalidRequest(f"the model backend refused the request: {errors.echo(message)}", code="backend_refused")


async def _events(response: aiohttp.ClientResponse, deadline: Callable[[], float] | None) -> AsyncIterator[dict]:
    async with response:
        async for raw in response.content:
            if deadline is not None and time.monotonic() > deadline():
                raise CallExpired()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict):
                yield event
            else:
                log.warning("skipping a malformed event from the backend", extra={"data": data[:200]})
