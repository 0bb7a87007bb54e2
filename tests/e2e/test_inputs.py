"""Chat content parts that cost, and the URL rule, end to end: the real Envoy, every service and
the reference backend (which counts an image 765 tokens, audio 10 a second, a file a token per 4
bytes, and never fetches a URL).

ledger_svc holds every image, audio and file part by the model's catalog rule (ref-chat: 1445
tokens an image, 10 a second of audio, a byte a token of a file) before the call runs, and the
call is charged what the backend counted; a model without a rule for a part type refuses it
(400 naming the part); a URL into a private network, or any address that is not public, is a
400 naming the part's URL that never reaches the backend and costs nothing."""
import base64

import httpx
import openai
import pytest

from common import catalog, money, pricing
from tests import audio
from tests.e2e.conftest import assert_openai_error, eventually

pytestmark = pytest.mark.timeout(180)

MODEL = "ref-chat"
SETTLE_S_MAX = 10.0
IMAGE = {"type": "image_url", "image_url": {"url": "https://93.184.215.14/cat.png"}}


@pytest.fixture
def paid(customer, operator):
    """A customer whose key may make the calls of one test (Paid: 300 a minute)."""
    operator("tier", customer.key_id, "paid")
    return customer


def account(base_url: str, customer) -> dict:
    reply = httpx.get(f"{base_url}/v1/account", headers=customer.auth, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def backend_requests(mesh) -> int:
    return httpx.get(f"http://127.0.0.1:{mesh.config.backend_port}/_stats", timeout=5).json()["requests"]


def post_chat(base_url: str, customer, parts: list, model: str = MODEL, **fields) -> httpx.Response:
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": parts}], **fields}
    return httpx.post(f"{base_url}/v1/chat/completions", headers=customer.auth, json=body, timeout=30)


def prices(model: str = MODEL) -> dict[str, int]:
    return catalog.load(catalog.default_path()).get(model).prices_nanos()


def settled_with_nothing_held(base_url: str, customer) -> dict:
    return eventually(lambda: (a := account(base_url, customer))["held_usd"] == "0.00" and a,
                      "no hold left", SETTLE_S_MAX)


def test_each_costly_part_type_is_charged_as_the_backend_counts_it(mesh, base_url, paid):
    wav = audio.sine_wav(2.0)
    cases = [
        (IMAGE, 765),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}, 85),
        ({"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}, 20),
        ({"type": "file", "file": {"filename": "notes.txt",
                                   "file_data": "data:text/plain;base64," + base64.b64encode(b"n" * 400).decode()}},
         100),
    ]
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=paid.api_key, max_retries=0, timeout=30) as api:
        for part, part_tokens in cases:
            before = money.parse_usd(account(base_url, paid)["balance_usd"])
            raw = api.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=4,
                messages=[{"role": "user", "content": [{"type": "text", "text": "what is this"}, part]}])
            usage = raw.parse().usage
            assert usage.prompt_tokens == 3 + 4 + 3 + part_tokens, (part["type"], usage)
            cost = pricing.cost_nanos(prices(), {"input_tokens": usage.prompt_tokens,
                                                 "output_tokens": usage.completion_tokens})
            assert raw.headers["x-usage-cost-usd"] == money.usd(cost) == usage.cost
            after = settled_with_nothing_held(base_url, paid)
            assert before - money.parse_usd(after["balance_usd"]) == cost, part["type"]


def test_images_are_held_by_the_rule_while_the_call_runs(base_url, paid, operator):
    """20 images hold 20 x 1445 tokens at ref-chat-large's input price ($3 a million): an
    account left with $0.01 can start such a call, and the hold then refuses the next one."""
    operator("credit", paid.account_id, "-9.99", "--reason", "e2e: one cent left")
    parts = [{"type": "text", "text": "[[tokens=200]] [[delay_ms=50]] describe"}, *[IMAGE] * 20]
    body = {"model": "ref-chat-large", "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": parts}]}
    words = len(parts[0]["text"].encode())
    worst = pricing.cost_nanos(prices("ref-chat-large"),
                               {"input_tokens": words + 8 + 8 + 20 * 1445, "output_tokens": 200})
    assert worst > 20 * 1445 * 3000 > money.parse_usd("0.01")  # the images alone cost $0.0867
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", headers=paid.auth, json=body,
                      timeout=30) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        running = account(base_url, paid)
        assert money.parse_usd(running["held_usd"]) == worst, running
        assert money.parse_usd(running["available_usd"]) == money.parse_usd("0.01") - worst
        refused = post_chat(base_url, paid, [{"type": "text", "text": "hi"}])
        assert refused.status_code == 402, refused.text
    settled_with_nothing_held(base_url, paid)


@pytest.mark.parametrize("url,why", [
    ("http://169.254.169.254/latest/meta-data/iam/", "link-local"),
    ("http://127.0.0.1:{backend}/v1/models", "loopback"),
    ("http://[::1]:{backend}/", "loopback"), ("http://localhost:{backend}/v1/models", "special-use"),
    ("http://10.0.0.1/", "private"), ("http://172.16.5.4/", "private"), ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "shared"), ("http://[fc00::1]/", "private"), ("http://[fe80::1]/", "link-local"),
    ("http://224.0.0.251/", "multicast"), ("http://[ff02::1]/", "multicast"),
    ("http://0.0.0.0:{backend}/", "unspecified"),
    ("http://[::]/", "unspecified"), ("http://[::ffff:127.0.0.1]:{backend}/", "loopback"),
    ("http://[::ffff:a9fe:a9fe]/", "link-local"), ("http://2130706433:{backend}/", "loopback"),
    ("http://0x7f.1:{backend}/", "loopback"), ("http://0177.0.0.1/", "loopback"),
    ("http://public@127.0.0.1:{backend}/", "credentials"), ("file:///etc/passwd", "only https://"),
    ("gopher://127.0.0.1:6379/_INFO", "only https://"), ("data:text/html;base64,PGgxPg==", "must be of type"),
])
def test_forbidden_urls_are_400_never_reach_the_backend_and_cost_nothing(mesh, base_url, paid, url, why):
    url = url.format(backend=mesh.config.backend_port)
    before, ran = account(base_url, paid), backend_requests(mesh)
    reply = post_chat(base_url, paid, [{"type": "text", "text": "look"}, IMAGE,
                                       {"type": "image_url", "image_url": {"url": url}}])
    error = assert_openai_error(reply, 400, code="invalid_url", error_type="invalid_request_error")
    assert error["param"] == "messages[0].content[2].image_url.url" and why in error["message"], error
    stream = post_chat(base_url, paid, [{"type": "image_url", "image_url": {"url": url}}], stream=True)
    assert assert_openai_error(stream, 400)["param"] == "messages[0].content[0].image_url.url"
    after = settled_with_nothing_held(base_url, paid)
    assert after["balance_usd"] == before["balance_usd"], (before, after)
    assert backend_requests(mesh) == ran


@pytest.mark.parametrize("part", [
    IMAGE, {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio.sine_wav(0.5)).decode(),
                                                   "format": "wav"}},
    {"type": "file", "file": {"file_data": base64.b64encode(b"text").decode()}}])
def test_a_model_that_does_not_take_a_part_type_refuses_it_naming_the_part(mesh, base_url, paid, part):
    before, ran = account(base_url, paid), backend_requests(mesh)
    reply = post_chat(base_url, paid, [{"type": "text", "text": "look"}, part], model="ref-instruct")
    error = assert_openai_error(reply, 400, code="unsupported_content_part")
    assert error["param"] == "messages[0].content[1]" and "ref-instruct" in error["message"], error
    assert account(base_url, paid) == before
    assert backend_requests(mesh) == ran


def test_part_data_ledger_did_not_hold_for_is_refused_and_voided(mesh, base_url, paid):
    """Parts the ledger held for but the router refuses (a file_id it cannot size, audio that is
    not base64, a data: URL too large for the rule) void the hold: nothing is charged."""
    before, ran = account(base_url, paid), backend_requests(mesh)
    for part, param in [
            ({"type": "file", "file": {"file_id": "file-abc"}}, "messages[0].content[0].file.file_id"),
            ({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}},
             "messages[0].content[0].input_audio.data"),
            ({"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGOD"}},
             "messages[0].content[0].image_url.url")]:
        error = assert_openai_error(post_chat(base_url, paid, [part]), 400)
        assert error["param"] == param, error
    after = settled_with_nothing_held(base_url, paid)
    assert after["balance_usd"] == before["balance_usd"]
    assert backend_requests(mesh) == ran
