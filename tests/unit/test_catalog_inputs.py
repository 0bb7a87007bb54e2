"""The catalog's content part rules: parsed, validated, and a bad one stops start-up."""
import pytest

from common import catalog, errors

HEAD = """
models:
  - id: m
    type: {kind}
    backends: [{{url: "http://127.0.0.1:1/v1"}}]
    pricing: {pricing}
"""
TEXT_PRICING = '{input_per_million_tokens: "1", output_per_million_tokens: "2"}'


def load(tmp_path, inputs: str, kind: str = "text", pricing: str = TEXT_PRICING) -> catalog.Catalog:
    path = tmp_path / "catalog.yaml"
    path.write_text(HEAD.format(kind=kind, pricing=pricing) + (f"    inputs: {inputs}\n" if inputs else ""))
    return catalog.load(path)


def test_rules_are_read_per_part_type(tmp_path):
    model = load(tmp_path, "{image_url: {tokens_each: 1445}, input_audio: {tokens_per_second: 10, max_bytes: 1000},"
                           " file: {tokens_each: 5000}}").get("m")
    assert model.inputs == {"image_url": catalog.InputRule(tokens_each=1445),
                            "input_audio": catalog.InputRule(tokens_per_second=10, max_bytes=1000),
                            "file": catalog.InputRule(tokens_each=5000)}
    assert model.input_rule("file", "messages[0].content[1]") == catalog.InputRule(tokens_each=5000)


def test_a_model_without_rules_accepts_text_only(tmp_path):
    model = load(tmp_path, "").get("m")
    assert model.inputs == {}
    with pytest.raises(errors.InvalidRequest) as caught:
        model.input_rule("image_url", "messages[2].content[0]")
    assert caught.value.param == "messages[2].content[0]" and caught.value.code == "unsupported_content_part"
    assert "does not accept content parts of type 'image_url'" in caught.value.message


@pytest.mark.parametrize("inputs,problem", [
    ("{video_url: {tokens_each: 1}}", "not a part type"),
    ("[image_url]", "must map part types"),
    ("{image_url: 1445}", "takes tokens_each, max_bytes"),
    ("{image_url: {tokens_per_second: 10}}", "takes tokens_each, max_bytes"),
    ("{image_url: {max_bytes: 10}}", "needs exactly one of tokens_each"),
    ("{file: {tokens_each: 1, tokens_per_byte: 1}}", "needs exactly one of tokens_per_byte, tokens_each"),
    ("{image_url: {tokens_each: 0}}", "whole number from 1"),
    ("{image_url: {tokens_each: -5}}", "whole number from 1"),
    ("{image_url: {tokens_each: 1.5}}", "whole number from 1"),
    ("{image_url: {tokens_each: true}}", "whole number from 1"),
    ("{image_url: {tokens_each: '100'}}", "whole number from 1"),
    ("{input_audio: {tokens_per_second: 10, max_bytes: 999999999}}", "max_bytes is at most"),
])
def test_a_bad_rule_stops_start_up_with_a_clear_message(tmp_path, inputs, problem):
    with pytest.raises(catalog.CatalogError) as caught:
        load(tmp_path, inputs)
    assert problem in str(caught.value) and "models[0] (m)" in str(caught.value), str(caught.value)


def test_only_text_models_take_rules(tmp_path):
    with pytest.raises(catalog.CatalogError, match="only a text model takes 'inputs'"):
        load(tmp_path, "{image_url: {tokens_each: 1}}", kind="image", pricing='{per_image: "0.04"}')


def test_the_reference_models_rules():
    models = catalog.load(catalog.default_path())
    for name in ("ref-chat", "ref-chat-large"):
        assert set(models.get(name).inputs) == {"image_url", "input_audio", "file"}, name
    assert models.get("ref-instruct").inputs == {}
