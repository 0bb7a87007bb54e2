"""router_svc's caps and cut at the hold (router_svc.meter, and the request side in domain)."""
import pytest
from google.protobuf import json_format

from common import catalog, errors
from common.held import Held
from router_svc import domain, meter
from tokens.router.v1 import router_pb2

MODEL = catalog.Model(id="m", type="text", owned_by="t", created=0, backends=(catalog.Backend("http://x", "m"),),
                      limits={"max_output_tokens": 100}, pricing={"input_per_million_tokens": "1"}, options={})


def chat(**fields) -> router_pb2.CreateChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json_format.ParseDict(body, router_pb2.CreateChatCompletionRequest())


def completion(**fields) -> router_pb2.CreateCompletionRequest:
    return json_format.ParseDict({"model": "m", "prompt": "hi", **fields}, router_pb2.CreateCompletionRequest())


def sent(request, held: Held | None, is_chat: bool = True) -> dict:
    """What the backend is sent as its output cap."""
    body = (domain.chat_body if is_chat else domain.completion_body)(request, MODEL, "m")
    generated, returned = domain.choices(request, is_chat)
    caps = meter.caps(held, "m", domain.requested_output(request, is_chat), domain.output_cap(MODEL),
                      generated, returned)
    domain.send_output_cap(body, caps.per_choice, is_chat)
    return {k: v for k, v in body.items() if k in ("max_tokens", "max_completion_tokens")}


def held(output: int, input_tokens: int = 50) -> Held:
    return Held("m", {"input_tokens": input_tokens, "output_tokens": output})


def test_the_cap_always_reaches_the_backend_in_the_field_the_caller_used():
    assert sent(chat(), None) == {"max_tokens": 100}, "no cap asked: the model's"
    assert sent(chat(), held(100)) == {"max_tokens": 100}
    assert sent(chat(max_tokens=7), held(7)) == {"max_tokens": 7}
    assert sent(chat(max_completion_tokens=7), held(7)) == {"max_completion_tokens": 7}
    assert sent(chat(max_tokens=9, max_completion_tokens=7), held(7)) == {"max_tokens": 7, "max_completion_tokens": 7}
    assert sent(chat(max_tokens=5, max_completion_tokens=7), held(7)) == {"max_tokens": 5, "max_completion_tokens": 5}
    # Never more than what was held, per choice: n=3 over 60 tokens is 20 each.
    assert sent(chat(n=3), held(60)) == {"max_tokens": 20}
    assert sent(completion(prompt=["a", "b"], n=2, best_of=3), held(2 * 3 * 10), is_chat=False) == {"max_tokens": 10}
    assert sent(completion(), None, is_chat=False) == {"max_tokens": 100}
    with pytest.raises(errors.InvalidRequest) as caught:
        sent(chat(n=4), held(3))
    assert caught.value.code == "exceeds_hold"
    with pytest.raises(errors.InvalidRequest):
        sent(chat(), Held("other", {"input_tokens": 1, "output_tokens": 100}))


def test_choices_count_as_the_ledger_counts_them():
    assert domain.choices(chat(n=3), True) == (3, 3)
    assert domain.choices(completion(prompt=["a", "b", "c"], n=2), False) == (6, 6)
    assert domain.choices(completion(n=2, best_of=5), False) == (5, 2)
    assert domain.choices(completion(prompt=[[1, 2], [3]]), False) == (2, 2)


def test_a_unary_answer_is_charged_at_most_the_hold():
    caps = meter.caps(held(16_384, 80), "m", None, 16_384, 1, 1)
    answer = {"choices": [{"index": i} for i in range(11)],
              "usage": {"prompt_tokens": 10**9, "completion_tokens": 100_000}}
    assert meter.unary(caps, answer) == (80, 16_384, ["choices", "input_tokens", "output_tokens"])
    assert answer["choices"] == [{"index": 0}]
    fits = {"choices": [{"index": 0}], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}
    assert meter.unary(caps, fits) == (12, 5, [])
    for junk in ({"prompt_tokens": -5, "completion_tokens": "lots"}, {"completion_tokens": float("inf")}, None, 7):
        assert meter.unary(caps, {"usage": junk})[:2] == (0, 0)
    unheld = meter.caps(None, "m", None, 100, 1, 1)
    assert meter.unary(unheld, {"usage": {"prompt_tokens": 10**6, "completion_tokens": 10**6}}) == (10**6, 10**6, [])


def chunk(index: int = 0, content: str | None = "w", finish: str | None = None, usage: dict | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    event = {"id": "c", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        event["usage"] = usage
    return event


def test_a_stream_is_cut_at_the_hold_with_finish_reason_length():
    metering = meter.StreamMeter(meter.caps(held(3), "m", None, 100, 1, 1))
    for _ in range(3):
        forward, cut = metering.take(chunk())
        assert forward is not None and cut == [] and not metering.done
    forward, cut = metering.take(chunk())
    assert (forward, cut, metering.done) == (None, [0], True)
    assert metering.open_choices() == []
    assert metering.charge() == (0, 3, ["output_tokens"])


def test_each_choice_ends_at_its_own_cap():
    metering = meter.StreamMeter(meter.caps(held(4), "m", None, 100, 2, 2))
    assert metering.caps.per_choice == 2
    for _ in range(2):
        assert metering.take(chunk(0))[1] == []
    forward, cut = metering.take(chunk(0))
    assert (forward, cut, metering.done) == (None, [0], False)
    assert metering.take(chunk(0)) == (None, [])  # a choice already cut stays cut
    assert metering.take(chunk(1))[0]["choices"][0]["index"] == 1
    assert metering.take(chunk(1, None, "stop"))[0] is not None
    assert metering.open_choices() == []
    assert metering.take(chunk(5))[0] is None and "choices" in metering.over  # a choice nobody asked for


def test_reported_usage_counts_and_lies_are_cut():
    caps = meter.caps(held(10, 20), "m", None, 100, 1, 1)
    metering = meter.StreamMeter(caps)
    forward, _ = metering.take(chunk(usage={"prompt_tokens": 5, "completion_tokens": 4}))
    assert "usage" not in forward and metering.charge() == (5, 4, [])
    metering.take(chunk(usage={"prompt_tokens": 5, "completion_tokens": 10}))
    assert not metering.done
    forward, _ = metering.take(chunk(usage={"prompt_tokens": 10**6, "completion_tokens": 10**6}))
    assert forward is None and metering.done and metering.open_choices() == [0]
    assert metering.charge() == (20, 10, ["output_tokens", "input_tokens"])


def test_a_stream_of_nothing_ends():
    metering = meter.StreamMeter(meter.caps(held(5), "m", None, 100, 1, 1))
    events = 0
    while not metering.done:
        metering.take(chunk(content=None))
        events += 1
        assert events <= 5 + meter.EVENTS_PER_CHOICE + meter.EVENTS_SLACK + 1
    assert metering.over == ["events"] and metering.charge()[:2] == (0, 0)


def test_what_counts_as_output():
    metering = meter.StreamMeter(meter.caps(None, "m", None, 100, 1, 1))
    for delta in ({"role": "assistant"}, {"content": ""}, {}, {"role": "assistant", "content": None}):
        metering.take({"choices": [{"index": 0, "delta": delta}]})
    assert metering.counted == {}
    for delta in ({"content": "a"}, {"tool_calls": [{"index": 0}]}, {"reasoning_content": "r"}, {"refusal": "no"}):
        metering.take({"choices": [{"index": 0, "delta": delta}]})
    metering.take({"choices": [{"index": 0, "text": "t"}]})
    assert metering.counted == {0: 5}
    assert metering.take({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})[0] == {"choices": []}
