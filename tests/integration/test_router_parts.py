"""router_svc and the URL rule, built with build_server on port 0 (router_rig.py): chat content
parts in front of the real reference backend, and the image URLs a backend answers with,
fetched (or not) from real servers on 127.0.0.1. Names resolve through a fake resolver, so no
test needs the internet."""
import base64
import io
import json

import aiohttp
import aiohttp.web
import grpc
import pytest
from google.protobuf import json_format
from PIL import Image

from common import pricing, urls
from tests import audio
from tests.dns import FakeDns
from tests.integration import router_rig
from tokens.router.v1 import router_pb2

pytestmark = pytest.mark.timeout(120)

PRICES = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}
HELD = (("x-ts-hold", "hold-1"), ("x-ts-price", pricing.encode_header(PRICES)), ("x-request-id", "req-1"),
        ("x-ts-account", "acct_1"))


DNS = {"cdn.example.com": ["93.184.215.14", "2606:2800:220:1::1"], "intranet.example.com": ["10.0.0.5"],
       "rebind.example.com": ["93.184.215.14", "127.0.0.1"], "meta.example.com": ["169.254.169.254"]}


def chat_catalog(url: str) -> str:
    return f"""models:
  - id: ref-chat
    type: text
    backends: [{{url: "{url}/v1"}}]
    limits: {{max_output_tokens: 64}}
    inputs:
      image_url: {{tokens_each: 1445}}
      input_audio: {{tokens_per_second: 10}}
      file: {{tokens_per_byte: 1}}
    pricing: {{input_per_million_tokens: "0.50", output_per_million_tokens: "1.50"}}
  - id: ref-instruct
    type: text
    backends: [{{url: "{url}/v1"}}]
    pricing: {{input_per_million_tokens: "0.50", output_per_million_tokens: "1.50"}}
"""


@pytest.fixture
async def dns():
    return FakeDns(DNS)


@pytest.fixture
async def router(start_router, reference, dns) -> router_rig.Router:
    return await start_router([reference], chat_catalog(reference), resolve=dns)


def chat(model: str, parts: list, **fields) -> router_pb2.CreateChatCompletionRequest:
    body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": parts}], **fields}
    return json_format.ParseDict(body, router_pb2.CreateChatCompletionRequest())


async def refused(call) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    return json.loads(caught.value.details())["error"]


def image(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


async def test_costly_parts_reach_the_backend_and_are_charged_as_it_counts_them(router, dns):
    wav = audio.sine_wav(3.0)
    parts = [{"type": "text", "text": "compare these"}, image("https://cdn.example.com/cat.png"),
             image("data:image/png;base64,iVBORw0KGgo=", detail="low"),
             {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
             {"type": "file", "file": {"filename": "a.txt", "file_data": base64.b64encode(b"x" * 40).decode()}}]
    [reply] = [m async for m in router.stub.CreateChatCompletion(chat("ref-chat", parts), metadata=HELD)]
    usage = json.loads(reply.data)["usage"]
    # The reference backend: 2 words + 4 + 3, an image 765 (low detail 85), 10 a second of audio, a token per 4 bytes.
    assert usage["prompt_tokens"] == 2 + 4 + 3 + 765 + 85 + 30 + 10, usage
    [settlement] = await router.settled()
    assert settlement.outcome == "completed" and settlement.units.input_tokens == usage["prompt_tokens"]
    assert dns.hosts == ["cdn.example.com"]
    assert (await router.stats())["requests"] == 1


@pytest.mark.parametrize("url,why", [
    ("http://169.254.169.254/latest/meta-data/", "link-local"), ("http://127.0.0.1:8100/v1/models", "loopback"),
    ("http://[::1]/", "loopback"), ("http://10.1.2.3/a.png", "private"), ("http://192.168.0.10/", "private"),
    ("http://100.64.0.1/", "shared"), ("http://[fd00::1]/", "private"), ("http://239.1.1.1/", "multicast"),
    ("http://0.0.0.0/", "unspecified"), ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://2130706433/", "loopback"), ("http://public@127.0.0.1/", "credentials"),
    ("http://localhost/", "special-use"), ("https://intranet.example.com/a.png", "private"),
    ("https://rebind.example.com/a.png", "loopback"), ("https://meta.example.com/", "link-local"),
    ("https://nowhere.example.com/a.png", "does not resolve"), ("file:///etc/passwd", "only https://"),
    ("gopher://cdn.example.com/", "only https://")])
async def test_forbidden_urls_are_400_void_and_never_reach_the_backend(router, url, why):
    parts = [{"type": "text", "text": "look"}, image("https://cdn.example.com/ok.png"), image(url)]
    for call in (router.stub.CreateChatCompletion(chat("ref-chat", parts), metadata=HELD),
                 router.stub.StreamChat(chat("ref-chat", parts, stream=True), metadata=HELD),
                 router.stub.Chat(chat("ref-chat", parts), metadata=HELD)):
        error = await refused(call)
        assert error["param"] == "messages[0].content[2].image_url.url" and why in error["message"], error
        assert error["code"] == "invalid_url"
    settlements = await router.settled(3)
    assert [s.outcome for s in settlements] == ["failed"] * 3
    assert (await router.stats())["requests"] == 0


async def test_a_model_without_a_rule_for_the_part_refuses_it(router):
    parts = [{"type": "text", "text": "look"}, image("https://cdn.example.com/ok.png")]
    error = await refused(router.stub.CreateChatCompletion(chat("ref-instruct", parts), metadata=HELD))
    assert (error["param"], error["code"]) == ("messages[0].content[1]", "unsupported_content_part")
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"
    assert (await router.stats())["requests"] == 0


# --- image URLs a backend answers with ------------------------------------------------

def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return out.getvalue()


class Site:
    """A real HTTP server on 127.0.0.1 that counts the requests it gets."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.image_url = ""  # what the images route answers with
        self.redirect_to = ""
        self.runner: aiohttp.web.AppRunner | None = None
        self.origin = ""

    async def start(self) -> "Site":
        app = aiohttp.web.Application()
        app.router.add_post("/v1/images/generations", self._generate)
        app.router.add_get("/{name}", self._file)
        self.runner = aiohttp.web.AppRunner(app)
        await self.runner.setup()
        site = aiohttp.web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.origin = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def _generate(self, request):
        return aiohttp.web.json_response({"created": 1, "data": [{"url": self.image_url}]})

    async def _file(self, request):
        self.hits.append(request.path)
        if request.path == "/redirect":
            raise aiohttp.web.HTTPFound(self.redirect_to)
        if request.path == "/huge.png":
            return aiohttp.web.Response(body=bytes(40 * 1024 * 1024), content_type="image/png")
        return aiohttp.web.Response(body=png(), content_type="image/png")


@pytest.fixture
async def sites():
    started = [await Site().start(), await Site().start()]
    yield started
    for site in started:
        await site.runner.cleanup()


def image_catalog(url: str) -> str:
    return f"""models:
  - id: pictures
    type: image
    backends: [{{url: "{url}/v1"}}]
    limits: {{max_images: 1}}
    options: {{sizes: [256x256], default_size: 256x256}}
    pricing: {{per_image: "0.04"}}
"""


IMAGE_HELD = (("x-ts-hold", "hold-1"), ("x-ts-price", pricing.encode_header({"per_image": 40_000_000})),
              ("x-request-id", "req-1"), ("x-ts-account", "acct_1"), ("x-ts-held", "model=pictures,images=1"))


async def test_an_image_url_on_the_backends_own_origin_is_fetched(start_router, sites, dns):
    backend, _intranet = sites
    backend.image_url = f"{backend.origin}/made.png"
    router = await start_router([backend.origin], image_catalog(backend.origin), resolve=dns)
    reply = await router.stub.CreateImage(router_pb2.CreateImageRequest(model="pictures", prompt="a fox"),
                                          metadata=IMAGE_HELD)
    [item] = json.loads(reply.data)["data"]
    assert base64.b64decode(item["b64_json"]) == png()
    assert backend.hits == ["/made.png"]
    [settlement] = await router.settled()
    assert settlement.outcome == "completed" and settlement.units.images == 1


@pytest.mark.parametrize("answer", [
    "http://127.0.0.1:{intranet}/secret.png",  # loopback, not the backend's origin
    "http://localhost:{intranet}/secret.png", "http://2130706433:{intranet}/secret.png",
    "http://intranet.example.com:{intranet}/secret.png", "http://rebind.example.com:{intranet}/secret.png",
    "http://{backend}@127.0.0.1:{intranet}/secret.png",
    "{origin}/redirect",  # the backend's own origin, redirecting into the intranet: not followed
    "{origin}/huge.png",  # over the bound on an image's size
])
async def test_image_urls_into_private_networks_are_never_fetched(start_router, sites, dns, answer):
    backend, intranet = sites
    intranet_port = intranet.origin.rsplit(":", 1)[1]
    backend.image_url = answer.format(intranet=intranet_port, origin=backend.origin,
                                      backend=backend.origin.removeprefix("http://"))
    backend.redirect_to = f"{intranet.origin}/secret.png"
    router = await start_router([backend.origin], image_catalog(backend.origin), resolve=dns)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.CreateImage(router_pb2.CreateImageRequest(model="pictures", prompt="a fox"),
                                      metadata=IMAGE_HELD)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert json.loads(caught.value.details())["error"]["code"] == "backend_no_output"
    assert intranet.hits == []
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"


async def test_a_pinned_fetch_connects_only_to_the_checked_address(sites):
    """The session _fetch_image uses for a checked URL: the name is never looked up again
    (pinned.example.com exists nowhere, yet it reaches 127.0.0.1, the address it was pinned to),
    and a host that was not checked cannot be fetched at all."""
    _backend, site = sites
    port = int(site.origin.rsplit(":", 1)[1])
    async with urls.pinned_session({"pinned.example.com": ("127.0.0.1",)}) as session:
        async with session.get(f"http://pinned.example.com:{port}/a.png", allow_redirects=False) as got:
            assert got.status == 200 and await got.read() == png()
        with pytest.raises(aiohttp.ClientConnectorError):
            async with session.get(f"http://other.example.com:{port}/b.png"):
                pass
    assert site.hits == ["/a.png"]
