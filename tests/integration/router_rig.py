"""router_svc for integration tests: build_server on port 0 in front of the given backends,
with its SQL store, the media paths, the video poller, and a fake ledger_svc that records
what it is sent. test_router_server.py and test_router_media.py start it through the
start_router fixture (conftest.py), which stops it after the test."""
import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import grpc
import httpx

from common import catalog, config as common_config, db, migrate, urls as common_urls
from router_svc import audio as audio_mod, backends as backends_mod, config as router_config, media_calls
from router_svc import server as router_server, settle, store as router_store, videos as videos_mod
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tokens.router.v1 import router_pb2_grpc


class FakeLedger(ledger_pb2_grpc.LedgerServicer):
    """Takes every settlement and claim (or none while `down`), and prices ref-chat."""

    def __init__(self) -> None:
        self.settled: list[ledger_pb2.Settlement] = []
        self.claimed: list[str] = []
        self.down = False

    async def Settle(self, request, context):
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        self.settled.extend(request.settlements)
        return ledger_pb2.SettleResponse(results=[ledger_pb2.SettleResult(hold_id=s.hold_id, status="posted")
                                                  for s in request.settlements])

    async def ClaimHolds(self, request, context):
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        self.claimed.extend(request.hold_ids)
        return ledger_pb2.ClaimHoldsResponse(claimed=len(request.hold_ids))

    async def GetPrices(self, request, context):
        return ledger_pb2.GetPricesResponse(prices=[ledger_pb2.ModelPrice(
            model="ref-chat", pricing={"input_per_million_tokens": "0.50", "output_per_million_tokens": "1.50"})])


@dataclasses.dataclass
class Router:
    stub: router_pb2_grpc.InferenceStub
    ledger: FakeLedger
    backend: str  # the last backend URL it was given
    videos: videos_mod.Videos
    outbox: router_store.OutboxStore
    settler: settle.Settler
    close: Callable[[], Awaitable[None]]

    async def settled(self, count: int = 1) -> list[ledger_pb2.Settlement]:
        """The settlements the ledger got, once there are at least `count` (5 s at most)."""
        for _ in range(500):
            if len(self.ledger.settled) >= count:
                return self.ledger.settled
            await asyncio.sleep(0.01)
        raise AssertionError(f"expected {count} settlements, got {self.ledger.settled}")

    async def stats(self) -> dict:
        """The reference backend's own counters."""
        async with httpx.AsyncClient() as client:
            return (await client.get(self.backend + "/_stats")).json()


async def start(tmp_path, urls: list[str], catalog_yaml: str, resolve=None, **overrides) -> Router:
    """router_svc in front of `urls`, its catalog `catalog_yaml`; `overrides` replace settings;
    `resolve` stands in for DNS (common.urls.Resolver) where a test needs names resolved."""
    ledger = FakeLedger()
    ledger_server = grpc.aio.server()
    ledger_pb2_grpc.add_LedgerServicer_to_server(ledger, ledger_server)
    ledger_port = ledger_server.add_insecure_port("127.0.0.1:0")
    await ledger_server.start()
    url = f"sqlite:///{tmp_path / 'router.db'}"
    await migrate.upgrade("router_svc", url)
    engine = db.make_engine(url)
    settings = router_config.Settings(
        server=common_config.ServerSettings("127.0.0.1", 0, "INFO", "", 0, 1), database_url=url,
        database_schema="", catalog_path=tmp_path / "catalog.yaml", ledger_addr=f"127.0.0.1:{ledger_port}",
        settle_linger_s=0, outbox_retry_s=0.05, public_base_url="https://api.example.test",
        video_poll_s=0.05)
    settings = dataclasses.replace(settings, **overrides)
    settings.catalog_path.write_text(catalog_yaml)
    catalog_ = catalog.load(settings.catalog_path)
    channel = grpc.aio.insecure_channel(settings.ledger_addr)
    outbox = router_store.OutboxStore(engine)
    settler = settle.Settler(ledger_pb2_grpc.LedgerStub(channel), outbox, timeout_s=1,
                             batch_max=100, linger_s=0, queue_max=1000, retry_s=0.05)
    backends = backends_mod.Backends(connect_timeout_s=1, idle_timeout_s=30, total_timeout_s=30,
                                     max_connections=10, down_s=5)
    await backends.start()
    settler.start()
    resolve = resolve or common_urls.resolve_system
    media = media_calls.MediaCalls(settings, catalog_, backends, settler, router_store.ImageStore(engine),
                                   audio_mod.Decoder(2, 60), resolve)
    videos = videos_mod.Videos(settings, catalog_, backends, router_store.VideoStore(engine))
    media.start()
    videos.start()
    server, port, _health = router_server.build_server(settings, catalog_, backends, settler,
                                                       ledger_pb2_grpc.LedgerStub(channel), media=media,
                                                       videos=videos, resolve=resolve)
    await server.start()
    client = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20),
                                                                      ("grpc.max_receive_message_length", 64 << 20)])

    async def close() -> None:
        await client.close()
        await server.stop(None)
        await videos.stop()
        await media.stop()
        await settler.stop()
        await backends.close()
        await channel.close()
        await ledger_server.stop(None)
        await engine.dispose()

    return Router(router_pb2_grpc.InferenceStub(client), ledger, urls[-1], videos, outbox, settler, close)
