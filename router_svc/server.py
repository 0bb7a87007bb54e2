"""router_svc's gRPC face: OpenAI-compatible inference, metered and settled.

Envoy's filters have already authenticated the call, counted it against the
key's rate limit and held its worst-case cost (x-ts-hold, with the price
snapshot in x-ts-price and the units held in x-ts-held). This service validates
the request, calls a backend with no more output per choice than the hold
covers, cuts whatever the backend returns beyond the hold (router_svc.meter),
shows the caller what the call cost, and settles the hold with what was
actually produced: on success, on a client that leaves (mid-stream, or before
a non-streamed answer: the backend call then runs to its end and is charged),
and on failure (a call that produced nothing is voided).
"""
import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format

from common import catalog, clients, db, errors, grpcserver, held as held_mod, logs, migrate, money, pricing
from common import urls
from router_svc import audio as audio_mod, backends as backends_mod, domain, media_calls, meter, metrics, settle
from router_svc import store as store_mod
from router_svc import videos as videos_mod
from router_svc.config import Settings
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tokens.router.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (router_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,)


@dataclasses.dataclass
class Call:
    """One metered call: its hold, its price snapshot and what it consumed."""
    hold_id: str
    prices: dict[str, int]
    request_id: str
    held: held_mod.Held | None = None
    started: float = 0.0  # time.monotonic()
    input_tokens: int = 0
    output_tokens: int = 0
    # failed: nothing produced (void); aborted: ended early (charge what was
    # produced); completed.
    outcome: str = "failed"
    # Settled by a task of its own: a unary call whose client left while the backend worked.
    detached: bool = False

    def cost_nanos(self) -> int:
        return pricing.cost_nanos(self.prices, {"input_tokens": self.input_tokens,
                                                "output_tokens": self.output_tokens})

    def settlement(self) -> ledger_pb2.Settlement:
        return ledger_pb2.Settlement(
            hold_id=self.hold_id, outcome=self.outcome, request_id=self.request_id,
            ended_ms=int(time.time() * 1000),
            units=ledger_pb2.Units(input_tokens=self.input_tokens, output_tokens=self.output_tokens))


def _usage_with_cost(call: Call, usage: dict) -> dict:
    return {"prompt_tokens": call.input_tokens, "completion_tokens": call.output_tokens,
            "total_tokens": call.input_tokens + call.output_tokens,
            **{k: v for k, v in usage.items() if k not in ("prompt_tokens", "completion_tokens", "total_tokens")},
            "cost": money.usd(call.cost_nanos())}


def _finish_chunk(last: dict, model_id: str, index: int, chat: bool, include_usage: bool) -> dict:
    """The end of a choice the router cut: finish_reason "length", as a backend ends a capped one."""
    if chat:
        choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "length"}
    else:
        choice = {"index": index, "text": "", "logprobs": None, "finish_reason": "length"}
    chunk = {"id": last.get("id", ""), "object": last.get("object", "chat.completion.chunk" if chat
                                                          else "text_completion"),
             "created": last.get("created", int(time.time())), "model": model_id, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None
    return chunk


# What each kind of text call is built with: its backend body, and its backend path.
TEXT = {True: (domain.chat_body, "/chat/completions"), False: (domain.completion_body, "/completions")}


class Inference(router_pb2_grpc.InferenceServicer):
    def __init__(self, settings: Settings, catalog_: catalog.Catalog, backends: backends_mod.Backends,
                 settler: settle.Settler, ledger: ledger_pb2_grpc.LedgerStub, *,
                 media: media_calls.MediaCalls | None = None, videos: videos_mod.Videos | None = None,
                 resolve: urls.Resolver = urls.resolve_system) -> None:
        self.settings = settings
        self.resolve = resolve
        self.catalog = catalog_
        self.backends = backends
        self.settler = settler
        self.ledger = ledger
        self.media = media
        self.videos = videos
        self._prices: dict[str, dict[str, str]] = {}
        self._prices_at = 0.0

    # Metering

    def _begin(self, context: grpc.aio.ServicerContext) -> Call:
        """The call's hold and price snapshot (media_calls.begin: never a call without a hold)."""
        held = media_calls.begin(context, self.settings.allow_unheld_for_benchmarks)
        if held.hold_id:
            self.settler.started(held.hold_id)
        return Call(hold_id=held.hold_id, prices=held.prices, request_id=held.request_id, held=held.held,
                    started=time.monotonic())

    def _settle(self, call: Call) -> None:
        if call.hold_id and not call.detached:
            self.settler.submit(call.settlement())

    def _deadline(self, call: Call) -> Callable[[], float]:
        """When a stream must end (time.monotonic()): at the maximum call duration, or before
        its hold could lapse when the ledger has not taken its renewals (settle.Settler)."""
        ends, safe_until, hold_id = call.started + self.settings.call_max_s, self.settler.safe_until, call.hold_id
        return lambda: min(ends, safe_until(hold_id))

    # Text

    async def _text_call(self, call: Call, request, chat: bool) -> tuple[catalog.Model, dict, meter.Caps]:
        """The model, the backend's body and the call's caps: the body asks for no more output
        per choice than the hold covers (meter.caps), in the field the caller used, and every
        URL in it is known to be public (names need DNS)."""
        model = domain.text_model(self.catalog, request.model)
        body = TEXT[chat][0](request, model, model.id)
        await domain.check_part_urls(body, self.resolve)
        generated, returned = domain.choices(request, chat)
        caps = meter.caps(call.held, model.id, domain.requested_output(request, chat), domain.output_cap(model),
                          generated, returned)
        domain.send_output_cap(body, caps.per_choice, chat)
        return model, body, caps

    def _meter_unary(self, call: Call, model: catalog.Model, backend: catalog.Backend, result: dict,
                     caps: meter.Caps) -> None:
        call.input_tokens, call.output_tokens, over = meter.unary(caps, result)
        metrics.overran(backend.url, model.id, over, request_id=call.request_id, usage=result.get("usage"),
                        held_input=caps.input_tokens, held_output=caps.output_tokens)

    async def text_unary(self, call: Call, model: catalog.Model, body: dict, path: str, caps: meter.Caps) -> dict:
        # The backend call runs in a task of its own, so a client that leaves does not cancel
        # it: the model does the work anyway (bounded by the cap it was sent and the backend
        # timeout), and the call is charged for it when it ends (_finish_abandoned).
        work = asyncio.ensure_future(self.backends.complete(model, path, body, call.request_id))
        try:
            backend, result = await asyncio.shield(work)
        except asyncio.CancelledError:
            self._finish_abandoned(call, model, work, caps)
            raise
        except backends_mod.BackendFailed as failure:
            raise media_calls.unavailable(model.id, failure) from None
        self._meter_unary(call, model, backend, result, caps)
        call.outcome = "completed"
        usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
        result["model"] = model.id
        result["usage"] = _usage_with_cost(call, usage)
        return result

    def _finish_abandoned(self, call: Call, model: catalog.Model, work: asyncio.Future, caps: meter.Caps) -> None:
        """A unary call whose client left: settled (aborted, for what the backend reports,
        within the hold) when the backend answers; voided if it fails."""
        call.detached = True
        metrics.UNARY_ABANDONED.inc()

        async def finish() -> None:
            try:
                backend, result = await work
                self._meter_unary(call, model, backend, result, caps)
                call.outcome = "aborted"
            except asyncio.CancelledError:
                # Only at shutdown, once the grace for these has passed (settle.Settler.stop).
                log.warning("an abandoned call was still running at shutdown; voided", extra={"hold": call.hold_id})
                raise
            except Exception as error:  # noqa: BLE001 - whatever the backend did, the hold is settled
                log.info("an abandoned call failed on the backend", extra={"error": repr(error)})
            finally:
                if call.hold_id:
                    self.settler.submit(call.settlement())

        self.settler.detach(finish())

    async def text_stream(self, call: Call, model: catalog.Model, body: dict, path: str, include_usage: bool,
                          caps: meter.Caps, chat: bool) -> AsyncIterator[dict]:
        """The client's chunks. The backend is always asked for usage, so the call is billed on
        the backend's own count, even if the client leaves; never beyond the hold (meter)."""
        options = {"include_usage": True}
        continuous = all(b.continuous_usage for b in model.backends)
        if continuous:
            options["continuous_usage_stats"] = True
        body = dict(body, stream=True, stream_options=options)
        try:
            backend, events = await self.backends.stream(model, path, body, call.request_id,
                                                         deadline=self._deadline(call))
        except backends_mod.BackendFailed as failure:
            raise media_calls.unavailable(model.id, failure) from None
        # From here on the model is working: whatever it produced is charged.
        call.outcome = "aborted"
        metering = meter.StreamMeter(caps)
        last: dict = {}
        final_usage: dict = {}
        ended = ""
        try:
            async for event in events:
                if "error" in event:
                    yield {"error": event["error"]}
                    return
                usage = event.get("usage")
                if isinstance(usage, dict):
                    final_usage = usage
                forward, cut = metering.take(event)
                call.input_tokens, call.output_tokens, _over = metering.charge()
                if forward is not None and forward.get("choices"):
                    forward["model"] = model.id
                    if include_usage:
                        forward["usage"] = None
                    last = forward
                    yield forward
                for index in cut:
                    yield _finish_chunk(last, model.id, index, chat, include_usage)
                if metering.done:
                    ended = "overrun"
                    break
        except backends_mod.CallExpired:
            ended = "max_duration" if time.monotonic() >= call.started + self.settings.call_max_s else "hold"
            metrics.CALLS_ENDED.labels(reason=ended).inc()
            log.warning("a stream reached its deadline; ended", extra={"model": model.id, "reason": ended,
                                                                       "hold": call.hold_id})
        except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError) as error:
            log.warning("backend stream broke", extra={"model": model.id, "error": repr(error)})
            yield errors.Unavailable("the model backend stopped mid-stream", code="backend_interrupted").body()
            return
        finally:
            await events.aclose()
            metrics.overran(backend.url, model.id, metering.charge()[2], request_id=call.request_id,
                            reported_output=metering.reported_output, counted_output=sum(metering.counted.values()),
                            held_input=caps.input_tokens, held_output=caps.output_tokens)
        for index in metering.open_choices() if ended else ():
            yield _finish_chunk(last, model.id, index, chat, include_usage)
        call.outcome = "completed"
        if include_usage:
            yield {"id": last.get("id", ""), "object": last.get("object", "chat.completion.chunk"),
                   "created": last.get("created", int(time.time())), "model": model.id, "choices": [],
                   "usage": _usage_with_cost(call, final_usage)}

    async def _http(self, request, context, chat: bool):
        """Shared body of the OpenAI-shaped HTTP methods: raw JSON or SSE bytes."""
        call = self._begin(context)
        try:
            model, body, caps = await self._text_call(call, request, chat)
            path = TEXT[chat][1]
            if not request.stream:
                result = await self.text_unary(call, model, body, path, caps)
                await context.send_initial_metadata(((media_calls.COST_HEADER, result["usage"]["cost"]),))
                yield httpbody_pb2.HttpBody(content_type="application/json", data=media_calls.dumps(result))
                return
            first = True
            stream = self.text_stream(call, model, body, path, domain.wants_usage(request), caps, chat)
            try:
                async for event in stream:
                    frame = b"data: " + media_calls.dumps(event) + b"\n\n"
                    if first:
                        yield httpbody_pb2.HttpBody(content_type="text/event-stream", data=frame)
                        first = False
                    else:
                        yield httpbody_pb2.HttpBody(data=frame)
                    if "error" in event:
                        return
            finally:
                # The stream's own cleanup (its backend closed, its overruns counted) comes first.
                await stream.aclose()
            yield httpbody_pb2.HttpBody(data=b"data: [DONE]\n\n")
        finally:
            self._settle(call)

    def CreateChatCompletion(self, request, context):
        return self._http(request, context, chat=True)

    def CreateCompletion(self, request, context):
        return self._http(request, context, chat=False)

    # Typed methods for native gRPC callers

    async def _typed_unary(self, request, context, chat: bool, message_type):
        call = self._begin(context)
        try:
            model, body, caps = await self._text_call(call, request, chat)
            result = await self.text_unary(call, model, body, TEXT[chat][1], caps)
            return json_format.ParseDict(result, message_type(), ignore_unknown_fields=True)
        finally:
            self._settle(call)

    async def _typed_stream(self, request, context, chat: bool, message_type):
        call = self._begin(context)
        try:
            model, body, caps = await self._text_call(call, request, chat)
            stream = self.text_stream(call, model, body, TEXT[chat][1], True, caps, chat)
            try:
                async for event in stream:
                    if "error" in event:
                        raise errors.Unavailable(event["error"].get("message", media_calls.UNAVAILABLE))
                    yield json_format.ParseDict(event, message_type(), ignore_unknown_fields=True)
            finally:
                await stream.aclose()
        finally:
            self._settle(call)

    async def Chat(self, request, context):
        return await self._typed_unary(request, context, True, router_pb2.ChatCompletion)

    def StreamChat(self, request, context):
        return self._typed_stream(request, context, True, router_pb2.ChatCompletionChunk)

    async def Complete(self, request, context):
        return await self._typed_unary(request, context, False, router_pb2.Completion)

    def StreamComplete(self, request, context):
        return self._typed_stream(request, context, False, router_pb2.Completion)

    # Media (router_svc/media_calls.py, router_svc/videos.py)

    async def CreateImage(self, request, context):
        return await self.media.create_image(request, context)

    async def GetImageFile(self, request, context):
        return await self.media.image_file(request, context)

    def CreateSpeech(self, request, context):
        return self.media.speech(request, context)

    async def CreateTranscription(self, request, context):
        return await self.media.transcription(request, context)

    async def CreateVideo(self, request, context):
        return await self.videos.create(request, context, self.media.settle, self.settler.claim)

    async def GetVideo(self, request, context):
        return await self.videos.retrieve(request, context)

    def GetVideoContent(self, request, context):
        return self.videos.content(request, context)

    # Catalog

    async def _current_prices(self) -> dict[str, dict[str, str]]:
        if time.monotonic() - self._prices_at < self.settings.prices_ttl_s:
            return self._prices
        try:
            response = await self.ledger.GetPrices(
                ledger_pb2.GetPricesRequest(), timeout=self.settings.ledger_timeout_s, wait_for_ready=True,
                metadata=clients.metadata(logs.request_id.get()))
        except grpc.aio.AioRpcError:
            if self._prices:
                return self._prices
            raise errors.Unavailable("prices are unavailable right now; try again shortly") from None
        self._prices = {p.model: dict(p.pricing) for p in response.prices}
        self._prices_at = time.monotonic()
        return self._prices

    def _model_message(self, model: catalog.Model, prices: dict[str, dict[str, str]]) -> router_pb2.Model:
        return router_pb2.Model(id=model.id, object="model", created=model.created, owned_by=model.owned_by,
                                type=model.type, pricing=prices.get(model.id, model.pricing),
                                limits=router_pb2.ModelLimits(**model.limits))

    async def ListModels(self, request, context):
        prices = await self._current_prices()
        return router_pb2.ListModelsResponse(
            object="list", data=[self._model_message(m, prices) for m in self.catalog.models.values()])

    async def GetModel(self, request, context):
        model = self.catalog.get(request.model)
        if model is None:
            raise errors.NotFound(f"The model `{errors.echo(request.model)}` does not exist or you do not have access to it.",
                                  param="model", code="model_not_found")
        return self._model_message(model, await self._current_prices())


def build_server(settings: Settings, catalog_: catalog.Catalog, backends: backends_mod.Backends,
                 settler: settle.Settler, ledger: ledger_pb2_grpc.LedgerStub, *,
                 media: media_calls.MediaCalls | None = None, videos: videos_mod.Videos | None = None,
                 resolve: urls.Resolver = urls.resolve_system):
    """(server, port, health): not started; the caller starts it. Without `media` and `videos`
    (built on the SQL store), image URLs and video jobs answer 503. `resolve` looks up the
    hosts of URLs in chat parts (a test passes a fake one)."""
    media = media or media_calls.MediaCalls(settings, catalog_, backends, settler, None, audio_mod.Decoder(
        settings.audio_decodes_max, settings.audio_decode_timeout_s), resolve)
    videos = videos or videos_mod.Videos(settings, catalog_, backends, None)
    # Uploads (25 MB of audio) arrive as one message: grpc's default limit is 4 MiB.
    server, health = grpcserver.create(SERVICE_NAMES, max_receive_bytes=settings.max_request_bytes)
    router_pb2_grpc.add_InferenceServicer_to_server(
        Inference(settings, catalog_, backends, settler, ledger, media=media, videos=videos, resolve=resolve),
        server)
    port = grpcserver.bind(server, settings.server.host, settings.server.port, settings.server.tls)
    return server, port, health


async def main(settings: Settings) -> None:
    logs.setup("router_svc", settings.server.log_level)
    if settings.allow_unheld_for_benchmarks:
        log.warning("TOKENS_ALLOW_UNHELD_CALLS_FOR_BENCHMARKS is set: calls without a hold run FREE. "
                    "This is for benchmarks of the ledger hop only.")
    catalog_ = catalog.load(settings.catalog_path)
    engine = db.make_engine(settings.database_url, schema=settings.database_schema or None)
    await migrate.check("router_svc", engine)
    outbox = store_mod.OutboxStore(engine)
    channel = clients.channel(settings.ledger_addr, settings.server.tls)
    ledger = ledger_pb2_grpc.LedgerStub(channel)
    settler = settle.Settler(ledger, outbox, timeout_s=settings.ledger_timeout_s, batch_max=settings.settle_batch_max,
                             linger_s=settings.settle_linger_s, queue_max=settings.settle_queue_max,
                             retry_s=settings.outbox_retry_s, claim_after_s=settings.hold_claim_after_s,
                             hold_ttl_s=settings.hold_ttl_s, hold_claim_s=settings.hold_claim_s)
    backends = backends_mod.Backends(connect_timeout_s=settings.backend_connect_timeout_s,
                                     idle_timeout_s=settings.backend_idle_timeout_s,
                                     total_timeout_s=settings.backend_total_timeout_s,
                                     max_connections=settings.backend_max_connections,
                                     down_s=settings.backend_down_s)
    await backends.start()
    settler.start()
    media = media_calls.MediaCalls(settings, catalog_, backends, settler, store_mod.ImageStore(engine),
                                   audio_mod.Decoder(settings.audio_decodes_max, settings.audio_decode_timeout_s))
    videos = videos_mod.Videos(settings, catalog_, backends, store_mod.VideoStore(engine))
    media.start()
    videos.start()
    server, port, health = build_server(settings, catalog_, backends, settler, ledger, media=media, videos=videos)
    log.info("router_svc listening", extra={"port": port, "models": len(catalog_.models)})

    async def on_stop():
        await videos.stop()
        await media.stop()
        # Calls whose client left before their answer settle when the backend answers.
        await settler.stop(detached_s=settings.server.grace_s)
        await backends.close()
        await channel.close()
        await outbox.close()

    await grpcserver.run_until_signal(server, health, SERVICE_NAMES, settings.server,
                                      on_stop=on_stop)
