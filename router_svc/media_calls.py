"""router_svc's media calls: images, speech and transcription, metered and settled.

Each call runs under the hold ledger_svc took for its worst case (x-ts-hold, the price
snapshot in x-ts-price, and in x-ts-held the units held). The request is validated
against the catalog before any backend is called; the backend is chosen as for text
(rotation over the model's backends, the next one only on a failure before any output);
and the hold is settled with what was produced: images returned, characters of speech
input, the audio's decoded duration. A call that produced nothing is voided.
"""
import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import os
import time
import urllib.parse

import aiohttp
import grpc
from google.api import httpbody_pb2

from common import audio as common_audio, catalog, errors, held as held_mod, money, pricing, urls
from router_svc import audio as audio_mod, backends as backends_mod, domain, media, metrics, store as store_mod
from tokens.ledger.v1 import ledger_pb2

log = logging.getLogger(__name__)

COST_HEADER = "x-usage-cost-usd"
UNAVAILABLE = "the model backend is unavailable right now; try again shortly"
CHUNK_BYTES = 64 * 1024
IMAGE_FILES_PATH = "/v1/images/files/"
# An image a backend answers with a URL to is fetched within these bounds.
IMAGE_BYTES_MAX = 32 * 1024 * 1024
IMAGE_FETCH_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)
PRUNE_EVERY_S = 60.0


@dataclasses.dataclass
class MediaCall:
    """One metered media call: its hold, its price snapshot and what it produced."""
    hold_id: str
    prices: dict[str, int]
    request_id: str
    account_id: str
    held: held_mod.Held | None
    units: dict[str, int] = dataclasses.field(default_factory=dict)
    # failed: nothing produced (void); aborted: the client left (charge); completed.
    outcome: str = "failed"

    def cost_usd(self) -> str:
        return money.usd(pricing.cost_nanos(self.prices, self.units))

    def settlement(self) -> ledger_pb2.Settlement:
        return ledger_pb2.Settlement(hold_id=self.hold_id, outcome=self.outcome, request_id=self.request_id,
                                     ended_ms=int(time.time() * 1000), units=ledger_pb2.Units(**self.units))


def begin(context: grpc.aio.ServicerContext, allow_unheld: bool) -> MediaCall:
    found = dict.fromkeys(("x-ts-hold", "x-ts-price", held_mod.HEADER, "x-ts-account", "x-request-id"), "")
    for key, value in context.invocation_metadata() or ():
        if key in found:
            found[key] = value
    hold, price = found["x-ts-hold"], found["x-ts-price"]
    if not hold or not price:
        if not allow_unheld:
            log.error("call reached the router without a hold")
            raise errors.Unavailable("billing is unavailable right now; the call was not run",
                                     code="billing_unavailable")
        return MediaCall("", {}, found["x-request-id"], found["x-ts-account"], None)
    return MediaCall(hold, pricing.decode_header(price), found["x-request-id"], found["x-ts-account"],
                     held_mod.Held.parse(found[held_mod.HEADER]))


def account_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-ts-account":
            return value
    return ""


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def unavailable(model_id: str, failure: Exception) -> errors.Unavailable:
    log.warning("no backend served the call", extra={"model": model_id, "why": str(failure)})
    return errors.Unavailable(UNAVAILABLE)


class MediaCalls:
    def __init__(self, settings, catalog_, backends: backends_mod.Backends, settler,
                 images: store_mod.ImageStore | None, decoder: audio_mod.Decoder,
                 resolve: urls.Resolver = urls.resolve_system) -> None:
        self.settings = settings
        self.resolve = resolve
        self.catalog = catalog_
        self.backends = backends
        self.settler = settler
        self.images = images
        self.decoder = decoder
        self._prune_task: asyncio.Task | None = None

    def settle(self, call: MediaCall) -> None:
        if call.hold_id:
            self.settler.submit(call.settlement())

    def begin(self, context) -> MediaCall:
        call = begin(context, self.settings.allow_unheld_for_benchmarks)
        self.settler.started(call.hold_id)
        return call

    # Images

    async def create_image(self, request, context) -> httpbody_pb2.HttpBody:
        call = self.begin(context)
        try:
            model = domain.model_for(self.catalog, request.model, "image")
            ask = media.image_request(request, model)
            media.within_hold(call.held, model.id, "images", ask.n)
            try:
                backend, response = await self.backends.post(model, "/images/generations", call.request_id,
                                                              body=ask.backend_body())
                async with response:
                    payload = await response.json(content_type=None)
                if not isinstance(payload, dict):
                    raise ValueError("the answer is not a JSON object")
            except (backends_mod.BackendFailed, aiohttp.ClientError, TimeoutError, ValueError) as failure:
                raise unavailable(model.id, failure) from None
            returned = payload.get("data")
            if isinstance(returned, list) and len(returned) > ask.n:
                # Only the n asked for (and held) are kept, and charged.
                metrics.overran(backend.url, model.id, ["images"], asked=ask.n, returned=len(returned))
            pictures = await self._pictures(payload, ask.n, call.request_id, backend)
            if not pictures:
                raise errors.Unavailable("the model backend returned no image", code="backend_no_output")
            call.units, call.outcome = {"images": len(pictures)}, "completed"
            data = await self._image_data(pictures, ask.response_format, call.account_id)
            result = {"created": int(payload.get("created") or time.time()), "data": data}
            await context.send_initial_metadata(((COST_HEADER, call.cost_usd()),))
            return httpbody_pb2.HttpBody(content_type="application/json", data=dumps(result))
        finally:
            self.settle(call)

    async def _pictures(self, payload: dict, n: int, request_id: str,
                        backend: catalog.Backend) -> list[tuple[bytes, str, dict]]:
        """(bytes, their base64 as sent, the entry's other fields) of each image, at most n."""
        out = []
        for item in (payload.get("data") or [])[:n]:
            if not isinstance(item, dict):
                continue
            extra = {k: v for k, v in item.items() if k == "revised_prompt" and v}
            if isinstance(item.get("b64_json"), str):
                try:
                    out.append((base64.b64decode(item["b64_json"], validate=True), item["b64_json"], extra))
                except (binascii.Error, ValueError):
                    log.warning("skipping an image that is not base64")
            elif isinstance(item.get("url"), str):
                # A backend that answers with URLs anyway: fetch now, serve from here.
                png = await self._fetch_image(item["url"], backend, request_id)
                if png is not None:
                    out.append((png, base64.b64encode(png).decode(), extra))
        return out

    async def _fetch_image(self, url: str, backend: catalog.Backend, request_id: str) -> bytes | None:
        """An image a backend gave a URL to, fetched under common.urls' rule; None when it is not.

        A URL on the backend's own configured origin (the catalog's url, scheme://host:port)
        is the operator's and fetched as any backend call is, wherever that is. Any other URL
        must pass the rule (public addresses only), and the fetch connects to the very
        addresses that were checked, so a name that resolves elsewhere a moment later (DNS
        rebinding) cannot point it into a private network. Redirects are never followed
        and the body is bounded.
        """
        headers: dict[str, str] = {}
        if _on_origin(url, backend.url):
            session, owned = self.backends.session, False
            headers["x-request-id"] = request_id
        else:
            try:
                target, addresses = await urls.check(url, self.resolve)
            except urls.Refused as refusal:
                log.warning("not fetching an image URL a backend returned", extra={"why": str(refusal)})
                return None
            url, session, owned = target.url, urls.pinned_session({target.host: addresses}), True
        try:
            async with session.get(url, headers=headers, allow_redirects=False, timeout=IMAGE_FETCH_TIMEOUT) as got:
                if got.status != 200:
                    log.warning("an image URL a backend returned did not answer 200", extra={"status": got.status})
                    return None
                return await _read_bounded(got, IMAGE_BYTES_MAX)
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            log.warning("could not fetch an image from the backend", extra={"error": repr(error)})
            return None
        finally:
            if owned:
                await session.close()

    async def _image_data(self, pictures, response_format: str, account_id: str) -> list[dict]:
        if response_format == "b64_json":
            return [{"b64_json": b64, **extra} for _png, b64, extra in pictures]
        if self.images is None:
            raise errors.Unavailable("image URLs are not available on this server", code="image_urls_unavailable")
        expires_at = time.time() + self.settings.image_url_ttl_s
        rows, data = [], []
        for png, _b64, extra in pictures:
            content_type, extension = media.image_kind(png)
            file_id = "img_" + os.urandom(16).hex()
            rows.append({"id": file_id, "account_id": account_id, "content_type": content_type, "content": png,
                         "expires_at": expires_at})
            data.append({"url": f"{self.settings.public_base_url}{IMAGE_FILES_PATH}{file_id}.{extension}",
                         **extra})
        await self.images.put(rows)
        return data

    async def image_file(self, request, context) -> httpbody_pb2.HttpBody:
        file_id = request.file_id.rsplit(".", 1)[0]
        found = await self.images.get(file_id, time.time()) if self.images and file_id else None
        if found is None:
            raise errors.NotFound("No such image: image URLs are valid for "
                                  f"{self.settings.image_url_ttl_s / 60:g} minutes.", code="image_not_found")
        content_type, content = found
        return httpbody_pb2.HttpBody(content_type=content_type, data=content)

    def start(self) -> None:
        if self.images is not None:
            self._prune_task = asyncio.create_task(self._prune_loop(), name="router-image-prune")

    async def stop(self) -> None:
        if self._prune_task is not None:
            self._prune_task.cancel()
            await asyncio.gather(self._prune_task, return_exceptions=True)

    async def _prune_loop(self) -> None:
        while True:
            try:
                while await self.images.prune(time.time()) >= 1000:
                    pass
            except Exception as error:  # noqa: BLE001 - a passing database error must not end the loop
                log.warning("pruning expired images failed", extra={"error": repr(error)})
            await asyncio.sleep(PRUNE_EVERY_S)

    # Speech

    async def speech(self, request, context):
        """The audio bytes as the backend streams them; charged per character of input."""
        call = self.begin(context)
        try:
            model = domain.model_for(self.catalog, request.model, "tts")
            ask = media.speech_request(request, model)
            media.within_hold(call.held, model.id, "characters", ask.characters)
            try:
                _backend, response = await self.backends.post(model, "/audio/speech", call.request_id,
                                                               body=ask.backend_body())
            except backends_mod.BackendFailed as failure:
                raise unavailable(model.id, failure) from None
            call.units = {"characters": ask.characters}
            first = True
            async with response:
                try:
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        if first:
                            # The backend has made the audio: a client leaving from here on is charged.
                            call.outcome = "aborted"
                            await context.send_initial_metadata(((COST_HEADER, call.cost_usd()),))
                            yield httpbody_pb2.HttpBody(content_type=ask.content_type, data=chunk)
                            first = False
                        else:
                            yield httpbody_pb2.HttpBody(data=chunk)
                except (aiohttp.ClientError, TimeoutError) as error:
                    # The backend broke off: what reached the client is not the audio asked for.
                    call.outcome = "failed"
                    raise unavailable(model.id, error) from None
            if first:
                raise errors.Unavailable("the model backend returned no audio", code="backend_no_output")
            call.outcome = "completed"
        finally:
            self.settle(call)

    # Transcription

    async def transcription(self, request, context) -> httpbody_pb2.HttpBody:
        """The backend's transcript; charged on the audio's duration as decoded here."""
        call = self.begin(context)
        try:
            form = media.read_form(request.content_type, request.data)
            model = domain.model_for(self.catalog, media.form_model(form), "stt")
            ask = media.transcription_request(form, model)
            decoded = await self.decoder.decode(ask.file.data, model.limit("max_audio_seconds",
                                                                           catalog.AUDIO_SECONDS_MAX))
            audio_ms = common_audio.ms_nearest(decoded.frames, decoded.rate)
            media.check_duration(audio_ms, model)
            media.within_hold(call.held, model.id, "audio_ms", audio_ms)

            def form_for(backend) -> aiohttp.FormData:
                data = aiohttp.FormData()
                data.add_field("model", backend.model)
                for name, value in ask.fields.items():
                    for item in value if isinstance(value, list) else [value]:
                        data.add_field(name, item if isinstance(item, str) else json.dumps(item))
                data.add_field("file", ask.file.data, filename=ask.file.filename or "audio",
                               content_type=ask.file.content_type)
                return data

            try:
                _backend, response = await self.backends.post(model, "/audio/transcriptions", call.request_id,
                                                               form=form_for)
                async with response:
                    body = await response.read()
                    content_type = response.headers.get("content-type", "application/json")
            except (backends_mod.BackendFailed, aiohttp.ClientError, TimeoutError) as failure:
                raise unavailable(model.id, failure) from None
            call.units, call.outcome = {"audio_ms": audio_ms}, "completed"
            _compare(body, content_type, audio_ms)
            await context.send_initial_metadata(((COST_HEADER, call.cost_usd()),))
            return httpbody_pb2.HttpBody(content_type=content_type, data=body)
        finally:
            self.settle(call)


def _on_origin(url: str, backend_url: str) -> bool:
    """Whether `url` is on the backend's configured origin. Compared as text up to the first
    "/" after the authority, so no parser can read a different host into it."""
    parts = urllib.parse.urlsplit(backend_url)
    origin = f"{parts.scheme}://{parts.netloc}/".lower()
    return url[:len(origin)].lower() == origin


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    if (response.content_length or 0) > limit:
        log.warning("an image URL a backend returned is too large", extra={"bytes": response.content_length})
        return None
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):  # bounded: stops past `limit`
        size += len(chunk)
        if size > limit:
            log.warning("an image URL a backend returned is too large", extra={"bytes_max": limit})
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _compare(body: bytes, content_type: str, audio_ms: int) -> None:
    """Logs a backend whose own duration differs from the decode (billing uses the decode)."""
    if not content_type.startswith("application/json"):
        return
    try:
        seconds = float(json.loads(body)["usage"]["seconds"])
    except (ValueError, KeyError, TypeError):
        return
    if abs(seconds * 1000 - audio_ms) > 1:
        log.warning("the backend's audio duration differs from the gateway's decode",
                    extra={"backend_ms": round(seconds * 1000, 3), "decoded_ms": audio_ms})
