"""The rules of a text call: validating OpenAI's request fields and turning the
request message into the JSON body an OpenAI-compatible backend expects.

Pure: no grpc, HTTP or SQL (the DNS lookups of check_part_urls go through the
resolver it is given). Every check raises common.errors.InvalidRequest naming
the offending field (OpenAI's `param`), so nothing invalid ever reaches a
backend or costs anything.
"""
import asyncio
import contextlib
import math

from google.protobuf import struct_pb2

from common import catalog, errors, urls

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 8
MAX_STOP = 4
MAX_MESSAGES = 2048
MAX_USER_CHARS = 512
MAX_METADATA = 16
# Content parts other than text in one call (OpenAI takes up to 500 images), and the
# distinct hosts their URLs may name: each is a DNS lookup before the backend is called.
MAX_MEDIA_PARTS = 500
MAX_URL_HOSTS = 16
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
FILE_TYPES = ("application/pdf", "text/")
AUDIO_FORMATS = ("wav", "mp3")
IMAGE_DETAILS = ("auto", "low", "high")


def value(v: struct_pb2.Value):
    """google.protobuf.Value -> plain Python, without json_format's overhead."""
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        number = v.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return struct(v.struct_value)
    if kind == "list_value":
        return [value(item) for item in v.list_value.values]
    return None


def struct(s: struct_pb2.Struct) -> dict:
    return {key: value(item) for key, item in s.fields.items()}


def _range(name: str, number: float, low: float, high: float) -> None:
    if not math.isfinite(number) or number < low or number > high:
        raise errors.InvalidRequest(f"{name} must be between {low:g} and {high:g}, got {number:g}", param=name)


def _stop(v: struct_pb2.Value):
    stop = value(v)
    if stop is None:
        return None
    if isinstance(stop, str):
        return stop
    if isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop):
        return stop
    raise errors.InvalidRequest(f"stop must be a string or an array of up to {MAX_STOP} non-empty strings",
                                param="stop")


def model_for(catalog_: catalog.Catalog, model_id: str, kind: str) -> catalog.Model:
    """The catalog's model of that id, which must be of this type (text, image, ...)."""
    if not model_id:
        raise errors.InvalidRequest("you must provide a model parameter", param="model", code="missing_model")
    model = catalog_.get(model_id)
    if model is None:
        raise errors.NotFound(f"The model `{errors.echo(model_id)}` does not exist or you do not have access to it.",
                              param="model", code="model_not_found")
    if model.type != kind:
        raise errors.InvalidRequest(f"`{errors.echo(model_id)}` is a {model.type} model; it is not served on this endpoint",
                                    param="model", code="model_not_supported")
    return model


def text_model(catalog_: catalog.Catalog, model_id: str) -> catalog.Model:
    return model_for(catalog_, model_id, "text")


def output_cap(model: catalog.Model) -> int:
    """The most output tokens a choice of this model may have: what a call that names no
    max_tokens is sent (and a larger max_tokens is refused, as OpenAI does)."""
    return model.limit("max_output_tokens", 4096)


def _max_tokens(name: str, requested: int, model: catalog.Model) -> int:
    cap = output_cap(model)
    if requested < 1:
        raise errors.InvalidRequest(f"{name} must be at least 1, got {requested}", param=name,
                                    code="invalid_value")
    if requested > cap:
        raise errors.InvalidRequest(f"{name} is too large: {requested}. This model supports at most {cap} "
                                    "completion tokens.", param=name, code="invalid_value")
    return requested


def _sampling(request, body: dict) -> None:
    """Fields chat and completions share."""
    if request.HasField("temperature"):
        _range("temperature", request.temperature, 0, 2)
        body["temperature"] = request.temperature
    if request.HasField("top_p"):
        _range("top_p", request.top_p, 0, 1)
        body["top_p"] = request.top_p
    if request.HasField("n"):
        if not 1 <= request.n <= MAX_N:
            raise errors.InvalidRequest(f"n must be between 1 and {MAX_N}, got {request.n}", param="n")
        body["n"] = request.n
    if request.HasField("presence_penalty"):
        _range("presence_penalty", request.presence_penalty, -2, 2)
        body["presence_penalty"] = request.presence_penalty
    if request.HasField("frequency_penalty"):
        _range("frequency_penalty", request.frequency_penalty, -2, 2)
        body["frequency_penalty"] = request.frequency_penalty
    if request.HasField("seed"):
        body["seed"] = request.seed
    if request.logit_bias:
        for token, bias in request.logit_bias.items():
            if not token.isdigit():
                raise errors.InvalidRequest("logit_bias keys must be token ids", param="logit_bias")
            _range("logit_bias", bias, -100, 100)
        body["logit_bias"] = dict(request.logit_bias)
    if request.user:
        if len(request.user) > MAX_USER_CHARS:
            raise errors.InvalidRequest(f"user must be at most {MAX_USER_CHARS} characters", param="user")
        body["user"] = request.user
    stop = _stop(request.stop) if request.HasField("stop") else None
    if stop is not None:
        body["stop"] = stop
    if request.HasField("stream_options"):
        if not request.stream:
            raise errors.InvalidRequest("stream_options is only allowed when stream is true",
                                        param="stream_options")


def _content(index: int, role: str, v: struct_pb2.Value, model: catalog.Model):
    content = value(v)
    if content is None or isinstance(content, str):
        if content is None and role not in ("assistant", "function"):
            raise errors.InvalidRequest(f"messages[{index}].content is required for role {role}",
                                        param=f"messages[{index}].content")
        return content
    if not isinstance(content, list) or not content:
        raise errors.InvalidRequest(f"messages[{index}].content must be a string or a non-empty array of "
                                    "content parts", param=f"messages[{index}].content")
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise errors.InvalidRequest(f"{where} must be an object with a type", param=where)
        kind = part["type"]
        if kind in ("text", "refusal"):
            if not isinstance(part.get(kind), str):
                raise errors.InvalidRequest(f"{where}.{kind} must be a string", param=f"{where}.{kind}")
            continue
        rule = model.input_rule(kind, where)  # the 400 for a part type the model does not take
        if role != "user":
            raise errors.InvalidRequest(f"{where}: {kind} parts are only accepted in user messages", param=where)
        content[part_index] = _media_part(part, kind, rule, where)
    return content


def _media_part(part: dict, kind: str, rule: catalog.InputRule, where: str) -> dict:
    """The part as the backend gets it (an image's URL rebuilt from what was checked); a 400
    for data ledger_svc did not hold for, or a URL the gateway must not relay."""
    inner = part.get(kind)
    where = f"{where}.{kind}"
    if not isinstance(inner, dict):
        raise errors.InvalidRequest(f"{where} must be an object", param=where)
    if kind == "image_url":
        detail = inner.get("detail")
        if detail is not None and detail not in IMAGE_DETAILS:
            raise errors.InvalidRequest(f"{where}.detail must be one of {', '.join(IMAGE_DETAILS)}",
                                        param=f"{where}.detail")
        url = _string(inner, "url", where)
        with _refusal(f"{where}.url", "invalid_url"):
            if url[:5].lower() == "data:":
                urls.data_url(url, IMAGE_TYPES, rule.max_bytes)
            else:
                url = urls.parse(url).url
        return {**part, kind: {**inner, "url": url}}
    if kind == "input_audio":
        if inner.get("format") not in AUDIO_FORMATS:
            raise errors.InvalidRequest(f"{where}.format must be one of {', '.join(AUDIO_FORMATS)}",
                                        param=f"{where}.format")
        data = _string(inner, "data", where)
        with _refusal(f"{where}.data", "invalid_value"):
            urls.base64_size(data, rule.max_bytes)
        return part
    if "file_id" in inner:
        raise errors.InvalidRequest(f"{where}.file_id: files are not stored here; send the file's content in "
                                    "file_data", param=f"{where}.file_id")
    data = _string(inner, "file_data", where)
    with _refusal(f"{where}.file_data", "invalid_value"):
        if data[:5].lower() == "data:":
            urls.data_url(data, FILE_TYPES, rule.max_bytes)
        else:
            urls.base64_size(data, rule.max_bytes)
    return part


@contextlib.contextmanager
def _refusal(field: str, code: str):
    """urls.Refused as the 400 naming the field."""
    try:
        yield
    except urls.Refused as refusal:
        raise errors.InvalidRequest(f"{field}: {refusal}", param=field, code=code) from None


def _string(inner: dict, name: str, where: str) -> str:
    text = inner.get(name)
    if not isinstance(text, str) or not text:
        raise errors.InvalidRequest(f"{where}.{name} must be a non-empty string", param=f"{where}.{name}")
    return text


async def check_part_urls(body: dict, resolve: urls.Resolver) -> None:
    """Looks up the names in a chat body's image URLs (chat_body checked the rest) and refuses
    the call when one does not resolve, or resolves to an address that is not public."""
    named: dict[tuple[str, int], tuple[str, urls.Target]] = {}
    for index, message in enumerate(body.get("messages") or ()):
        content = message.get("content")
        for part_index, part in enumerate(content if isinstance(content, list) else ()):
            if part.get("type") != "image_url" or part["image_url"]["url"][:5].lower() == "data:":
                continue
            target = urls.parse(part["image_url"]["url"])
            if target.address is None:
                where = f"messages[{index}].content[{part_index}].image_url.url"
                named.setdefault((target.host, target.port), (where, target))
    if len(named) > MAX_URL_HOSTS:
        raise errors.InvalidRequest(f"the image URLs of one call may name at most {MAX_URL_HOSTS} hosts",
                                    param="messages", code="invalid_url")
    found = await asyncio.gather(*(urls.resolve_public(target, resolve) for _where, target in named.values()),
                                 return_exceptions=True)
    for (where, _target), result in zip(named.values(), found):
        if isinstance(result, urls.Refused):
            raise errors.InvalidRequest(f"{where}: {result}", param=where, code="invalid_url")
        if isinstance(result, BaseException):
            raise result


def _message(index: int, message, model: catalog.Model) -> dict:
    if message.role not in ROLES:
        raise errors.InvalidRequest(f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}, "
                                    f"got {errors.echo(message.role)!r}", param=f"messages[{index}].role")
    out = {"role": message.role, "content": _content(index, message.role, message.content, model)}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [struct(call) for call in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    elif message.role == "tool":
        raise errors.InvalidRequest(f"messages[{index}].tool_call_id is required for role tool",
                                    param=f"messages[{index}].tool_call_id")
    return out


def _media_parts(request) -> int:
    """Content parts of the request that are objects of a type other than text or refusal."""
    count = 0
    for message in request.messages:
        if message.content.WhichOneof("kind") != "list_value":
            continue
        for part in message.content.list_value.values:
            fields = part.struct_value.fields if part.WhichOneof("kind") == "struct_value" else {}
            count += "type" in fields and fields["type"].string_value not in ("text", "refusal")
    return count


def chat_body(request, model: catalog.Model, backend_model: str) -> dict:
    """CreateChatCompletionRequest -> the backend's JSON body (without stream fields)."""
    if not request.messages:
        raise errors.InvalidRequest("messages must be a non-empty array", param="messages")
    if len(request.messages) > MAX_MESSAGES:
        raise errors.InvalidRequest(f"at most {MAX_MESSAGES} messages", param="messages")
    if _media_parts(request) > MAX_MEDIA_PARTS:
        raise errors.InvalidRequest(f"at most {MAX_MEDIA_PARTS} image, audio and file parts in one call",
                                    param="messages")
    body = {"model": backend_model, "messages": [_message(i, m, model) for i, m in enumerate(request.messages)]}
    _sampling(request, body)
    if request.HasField("max_tokens"):
        body["max_tokens"] = _max_tokens("max_tokens", request.max_tokens, model)
    if request.HasField("max_completion_tokens"):
        body["max_completion_tokens"] = _max_tokens("max_completion_tokens", request.max_completion_tokens, model)
    if request.HasField("logprobs"):
        body["logprobs"] = request.logprobs
    if request.HasField("top_logprobs"):
        if not request.logprobs:
            raise errors.InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        _range("top_logprobs", request.top_logprobs, 0, 20)
        body["top_logprobs"] = request.top_logprobs
    if request.HasField("response_format"):
        kind = struct(request.response_format).get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise errors.InvalidRequest("response_format.type must be text, json_object or json_schema",
                                        param="response_format")
        body["response_format"] = struct(request.response_format)
    if request.tools:
        body["tools"] = [struct(tool) for tool in request.tools]
    if request.HasField("tool_choice"):
        body["tool_choice"] = value(request.tool_choice)
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.metadata:
        if len(request.metadata) > MAX_METADATA:
            raise errors.InvalidRequest(f"metadata has at most {MAX_METADATA} pairs", param="metadata")
        body["metadata"] = dict(request.metadata)
    if request.reasoning_effort:
        if request.reasoning_effort not in ("minimal", "low", "medium", "high"):
            raise errors.InvalidRequest("reasoning_effort must be minimal, low, medium or high",
                                        param="reasoning_effort")
        body["reasoning_effort"] = request.reasoning_effort
    return body


def completion_body(request, model: catalog.Model, backend_model: str) -> dict:
    prompt = value(request.prompt) if request.HasField("prompt") else None
    if prompt is None or prompt == "" or prompt == []:
        raise errors.InvalidRequest("prompt is required", param="prompt")
    if isinstance(prompt, list):
        if len(prompt) > MAX_MESSAGES or not all(isinstance(p, (str, list)) for p in prompt):
            raise errors.InvalidRequest("prompt must be a string, an array of strings or token arrays",
                                        param="prompt")
    elif not isinstance(prompt, str):
        raise errors.InvalidRequest("prompt must be a string, an array of strings or token arrays", param="prompt")
    body = {"model": backend_model, "prompt": prompt}
    _sampling(request, body)
    if request.HasField("max_tokens"):
        body["max_tokens"] = _max_tokens("max_tokens", request.max_tokens, model)
    if request.suffix:
        body["suffix"] = request.suffix
    if request.HasField("echo"):
        body["echo"] = request.echo
    if request.HasField("logprobs"):
        _range("logprobs", request.logprobs, 0, 5)
        body["logprobs"] = request.logprobs
    if request.HasField("best_of"):
        n = request.n if request.HasField("n") else 1
        if not n <= request.best_of <= MAX_N:
            raise errors.InvalidRequest(f"best_of must be between n and {MAX_N}", param="best_of")
        if request.stream:
            raise errors.InvalidRequest("best_of cannot be used with stream", param="best_of")
        body["best_of"] = request.best_of
    return body


def wants_usage(request) -> bool:
    return request.HasField("stream_options") and request.stream_options.include_usage


def requested_output(request, chat: bool) -> int | None:
    """The output cap per choice the caller gave (the smaller, when a chat call gives both
    max_tokens and max_completion_tokens); None when it gave none. Validated by *_body."""
    given = [request.max_tokens] if request.HasField("max_tokens") else []
    if chat and request.HasField("max_completion_tokens"):
        given.append(request.max_completion_tokens)
    return min(given) if given else None


def choices(request, chat: bool) -> tuple[int, int]:
    """(choices the backend generates, choices the client gets): n, and for completions n per
    prompt, best_of per prompt when larger (as ledger_svc counts them for the hold)."""
    n = request.n if request.HasField("n") else 1
    if chat:
        return n, n
    prompt = value(request.prompt) if request.HasField("prompt") else None
    prompts = len(prompt) if isinstance(prompt, list) and prompt else 1
    generated = max(n, request.best_of) if request.HasField("best_of") else n
    return prompts * generated, prompts * n


def send_output_cap(body: dict, cap: int, chat: bool) -> None:
    """Puts the cap in the backend's body in the field the caller used (chat: max_completion_tokens,
    max_tokens, or both with the one value), else max_tokens, which every OpenAI-compatible
    server takes (vLLM, Ollama, the reference backend)."""
    if chat and "max_completion_tokens" in body:
        body["max_completion_tokens"] = cap
        if "max_tokens" in body:
            body["max_tokens"] = cap
        return
    body["max_tokens"] = cap
