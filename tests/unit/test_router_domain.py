"""Validation of OpenAI text requests and their translation for a backend."""
import pytest
from google.protobuf import json_format

from common import catalog, errors
from router_svc import domain
from tokens.router.v1 import router_pb2

MODEL = catalog.Model(id="m", type="text", owned_by="t", created=0, backends=(catalog.Backend("http://x", "m"),),
                      limits={"max_output_tokens": 100}, pricing={"input_per_million_tokens": "1"}, options={})


def chat(**fields) -> router_pb2.CreateChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json_format.ParseDict(body, router_pb2.CreateChatCompletionRequest())


def test_the_backend_body_keeps_every_given_field_and_nothing_else():
    request = chat(temperature=0.5, top_p=1, n=2, stop=["a", "b"], max_tokens=10, seed=7, user="u",
                   messages=[{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                   tools=[{"type": "function", "function": {"name": "f"}}], response_format={"type": "json_object"})
    body = domain.chat_body(request, MODEL, "backend-name")
    assert body == {"model": "backend-name", "messages": [{"role": "system", "content": "be brief"},
                                                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "temperature": 0.5, "top_p": 1.0, "n": 2, "stop": ["a", "b"], "max_tokens": 10, "seed": 7,
                    "user": "u", "tools": [{"type": "function", "function": {"name": "f"}}],
                    "response_format": {"type": "json_object"}}


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 101}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"), ({"n": 9}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"), ({"presence_penalty": 3}, "presence_penalty"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"logit_bias": {"abc": 1}}, "logit_bias"),
])
def test_invalid_fields_name_their_param(fields, param):
    with pytest.raises(errors.InvalidRequest) as caught:
        domain.chat_body(chat(**fields), MODEL, "m")
    assert caught.value.param == param


def test_unknown_and_wrong_type_models():
    cat = catalog.Catalog(models={"m": MODEL, "img": catalog.Model(
        id="img", type="image", owned_by="t", created=0, backends=MODEL.backends, limits={},
        pricing={"per_image": "1"}, options={})}, path=None)
    with pytest.raises(errors.NotFound):
        domain.text_model(cat, "nope")
    with pytest.raises(errors.InvalidRequest):
        domain.text_model(cat, "img")
    with pytest.raises(errors.InvalidRequest):
        domain.text_model(cat, "")
    assert domain.text_model(cat, "m") is MODEL


def test_completion_prompt_forms():
    request = json_format.ParseDict({"model": "m", "prompt": ["a", "b"], "max_tokens": 3},
                                    router_pb2.CreateCompletionRequest())
    assert domain.completion_body(request, MODEL, "m")["prompt"] == ["a", "b"]
    with pytest.raises(errors.InvalidRequest):
        domain.completion_body(router_pb2.CreateCompletionRequest(model="m"), MODEL, "m")
