"""HTTP layer of the reference backend: OpenAI-compatible routes on aiohttp."""

import asyncio
import base64
import collections
import dataclasses
import functools
import hmac
import itertools
import json
import logging
import os
import secrets
import signal
import time

from aiohttp import web

from backends.reference import config, images, media, misbehave, parts, speech, text, transcription, video

BODY_BYTES_MAX = 1024 * 1024
N_MAX = 8
STOPS_MAX = 4
STOP_CHARS_MAX = 1024  # a stop string is held back this long, so it must stay short
PROMPTS_MAX = 16
# A forever stream's target: never reached at any pace a test runs for.
FOREVER_TOKENS = 10**15
MODELS = ("ref-chat", "ref-chat-large", "ref-instruct", "ref-image", "ref-video", "ref-tts",
          "ref-stt")
# Only the transcription route takes an upload: 25 MB of file plus the other form fields.
TRANSCRIPTION_BODY_BYTES_MAX = transcription.FILE_BYTES_MAX + BODY_BYTES_MAX
IMAGE_CACHE_ITEMS_MAX, IMAGE_CACHE_BYTES_MAX = 64, 32 * 1024 * 1024
IMAGE_FILES_MAX, IMAGE_FILES_BYTES_MAX = 256, 64 * 1024 * 1024
IMAGE_FILES_PATH = "/v1/files/images/"
# A hint read by the openai client's poll helpers while a video job runs.
_POLL_AFTER_MS = "200"
_MODELS_CREATED = 1_700_000_000
# With no delay a long answer is produced in a tight loop; flushing every so many
# chunks and yielding to the loop there lets a disconnect be noticed promptly.
_FLUSH_CHUNKS = 256
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = "data: [DONE]\n\n"

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Stats:
    """Counters for tests and benchmarks, served at GET /_stats; `requests` counts text calls."""

    requests: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    tokens_generated: int = 0
    images_generated: int = 0
    speech_characters: int = 0
    transcription_ms: float = 0.0
    videos_completed: int = 0
    videos_failed: int = 0
    video_seconds_produced: int = 0


@dataclasses.dataclass(slots=True)
class Job:
    """One validated generation request."""

    chat: bool
    model: str
    choices: list[text.Choice]
    prompt_tokens: int
    delay_ms: float
    stream: bool
    include_usage: bool
    continuous_usage: bool
    # Test-only lies (TOKENS_BACKEND_MISBEHAVE): misbehave.NONE otherwise.
    lie: misbehave.Misbehaviour = misbehave.NONE


class BadRequest(Exception):
    """A request we refuse; becomes OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code
        self.kind = kind


SETTINGS = web.AppKey("settings", config.Settings)
STATS = web.AppKey("stats", Stats)
IMAGE_CACHE = web.AppKey("image_cache", media.Lru)  # PNG by (model, prompt, size, index)
IMAGE_FILES = web.AppKey("image_files", media.Lru)  # PNG by the id in its URL
VIDEO_JOBS = web.AppKey("video_jobs", video.Jobs)
# The latest request bodies, for tests (TOKENS_BACKEND_RECORD_REQUESTS); absent when off.
RECORDED = web.AppKey("recorded", collections.deque)
# Ids only need to be unique within a process run; a counter is cheaper than uuid4.
_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)


def build_app(settings: config.Settings) -> web.Application:
    """The application with every route; authentication only when an API key is set."""
    middlewares = [_auth_middleware(settings.api_key)] if settings.api_key else []
    app = web.Application(client_max_size=BODY_BYTES_MAX, middlewares=middlewares)
    app[SETTINGS] = settings
    stats = app[STATS] = Stats()
    app[IMAGE_CACHE] = media.Lru(IMAGE_CACHE_ITEMS_MAX, IMAGE_CACHE_BYTES_MAX)
    app[IMAGE_FILES] = media.Lru(IMAGE_FILES_MAX, IMAGE_FILES_BYTES_MAX)
    app[VIDEO_JOBS] = video.Jobs(functools.partial(_count_video, stats))
    app.on_cleanup.append(_close_video_jobs)
    app.router.add_get("/health", _health)
    app.router.add_get("/_stats", _stats)
    if settings.record_requests:
        # Test-only: a deployment never sets it, and Envoy routes nothing here.
        app[RECORDED] = collections.deque(maxlen=settings.record_requests)
        app.router.add_get("/_requests", _recorded)
        app.router.add_delete("/_requests", _forget)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/images/generations", _images_generations)
    app.router.add_get(IMAGE_FILES_PATH + "{name}", _image_file)
    app.router.add_post("/v1/videos", _videos_create)
    app.router.add_get("/v1/videos/{video_id}", _videos_retrieve)
    app.router.add_get("/v1/videos/{video_id}/content", _videos_content)
    app.router.add_post("/v1/audio/speech", _speech)
    app.router.add_post("/v1/audio/transcriptions", _transcriptions)
    return app


async def start(settings: config.Settings) -> tuple[web.AppRunner, int]:
    """Binds and serves; returns the runner (call cleanup()) and the real port."""
    # handler_cancellation stops a stream's generation the moment its client goes.
    runner = web.AppRunner(build_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def main(settings: config.Settings) -> None:
    """Serves until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runner, port = await start(settings)
    log.info("reference backend on http://%s:%d", settings.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        # Image URLs work without the key, as OpenAI's signed URLs do: the id is 128 random bits.
        if request.path.startswith("/v1/") and not request.path.startswith(IMAGE_FILES_PATH):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return _error(BadRequest("Incorrect API key provided.", status=401,
                                         code="invalid_api_key"))
        return await handler(request)

    return auth


def _json(payload: object, status: int = 200) -> web.Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return web.Response(body=body, status=status, content_type="application/json")


def _error(exc: BadRequest) -> web.Response:
    error = {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.code}
    return _json({"error": error}, exc.status)


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    return _json(dataclasses.asdict(request.app[STATS]))


async def _recorded(request: web.Request) -> web.Response:
    return _json({"data": list(request.app[RECORDED])})


async def _forget(request: web.Request) -> web.Response:
    request.app[RECORDED].clear()
    return _json({"data": []})


def _record(request: web.Request, body: object) -> None:
    """Keeps what a route received, as it parsed it, when recording is on (tests only)."""
    recorded = request.app.get(RECORDED)
    if recorded is not None:
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() != "authorization"}
        recorded.append({"method": request.method, "path": request.path, "headers": headers, "body": body})


async def _models(request: web.Request) -> web.Response:
    data = [{"id": model, "object": "model", "created": _MODELS_CREATED, "owned_by": "reference"}
            for model in MODELS]
    return _json({"object": "list", "data": data})


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    stats = request.app[STATS]
    stats.requests += 1
    try:
        body = await _read_body(request)
        parse = _parse_chat if chat else _parse_completion
        job = parse(body, request.app[SETTINGS])
    except BadRequest as exc:
        return _error(exc)
    if job.stream:
        return await _stream(request, job, stats)
    return await _unary(job, stats)


# ---- request validation -------------------------------------------------------------


async def _read_body(request: web.Request) -> dict:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"Request body is larger than {BODY_BYTES_MAX} bytes.", status=413,
                         code="request_too_large") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest("Request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.")
    _record(request, body)
    return body


def _parse_chat(body: dict, settings: config.Settings) -> Job:
    model = _model(body)
    messages = _messages(body)
    n = _integer(body, "n", 1, N_MAX, 1)
    max_tokens = _max_tokens(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens")
    stops, seed = _stops(body), _seed(body)
    _check_sampling(body)
    stream, include_usage, continuous = _stream_options(body)
    last = _last_user_text(messages)
    target, delay_ms = _directives(last, settings, "messages")
    lie = _lie(last, settings, "messages", stream)
    target, delay_ms, max_tokens = _misbehaving(lie, target, delay_ms, max_tokens)
    base = text.seed_base(model, text.chat_seed_text(messages), seed)
    choices = [text.Choice(base, i, target, max_tokens, stops) for i in range(n)]
    try:
        prompt_tokens = text.chat_prompt_tokens(messages) + parts.prompt_tokens(messages)
    except ValueError as exc:
        raise BadRequest(str(exc), "messages") from None
    return Job(True, model, choices, prompt_tokens, delay_ms, stream, include_usage, continuous, lie)


def _parse_completion(body: dict, settings: config.Settings) -> Job:
    model = _model(body)
    prompts = _prompts(body)
    n = _integer(body, "n", 1, N_MAX, 1)
    max_tokens, stops, seed = _max_tokens(body, "max_tokens"), _stops(body), _seed(body)
    _check_sampling(body)
    stream, include_usage, continuous = _stream_options(body)
    choices: list[text.Choice] = []
    delay_ms = settings.token_delay_ms
    lie = _lie("\n".join(prompts), settings, "prompt", stream)
    # OpenAI numbers the choices of a prompt list prompt by prompt: index = prompt * n + i.
    for prompt in prompts:
        target, delay_ms = _directives(prompt, settings, "prompt")
        target, delay_ms, capped = _misbehaving(lie, target, delay_ms, max_tokens)
        base = text.seed_base(model, prompt, seed)
        choices.extend(text.Choice(base, i, target, capped, stops) for i in range(n))
    return Job(False, model, choices, text.completion_prompt_tokens(prompts), delay_ms,
               stream, include_usage, continuous, lie)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string.", "model")
    return model


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", "messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("Each message must be an object with a string 'role'.", "messages")
        _check_content(message.get("content"))
    return messages


def _check_content(content: object) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest("Message 'content' must be a string, an array of parts, or null.",
                         "messages")
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest("Each content part must be an object with a string 'type'.",
                             "messages")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise BadRequest("A text content part needs a string 'text'.", "messages")


def _prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if (not isinstance(prompt, list) or not 1 <= len(prompt) <= PROMPTS_MAX
            or not all(isinstance(p, str) for p in prompt)):
        raise BadRequest(f"'prompt' must be a string or an array of 1 to {PROMPTS_MAX} strings.",
                         "prompt")
    return prompt


def _integer(body: dict, name: str, low: int, high: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer between {low} and {high}.", name)
    return value


def _max_tokens(body: dict, name: str) -> int | None:
    return _integer(body, name, 1, 2**31 - 1, None)


def _seed(body: dict) -> int | None:
    return _integer(body, "seed", -(2**63), 2**64 - 1, None)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > STOPS_MAX
            or not all(isinstance(s, str) and len(s) <= STOP_CHARS_MAX for s in stops)):
        raise BadRequest(f"'stop' must be a string or an array of up to {STOPS_MAX} strings "
                         f"of at most {STOP_CHARS_MAX} characters.", "stop")
    return tuple(s for s in stops if s)  # an empty stop string would match everywhere


def _check_sampling(body: dict) -> None:
    """Only types and ranges are checked: sampling does not change our deterministic text."""
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 <= value <= high):
            raise BadRequest(f"'{name}' must be a number between 0 and {high:g}.", name)
    if not isinstance(body.get("user", ""), str):
        raise BadRequest("'user' must be a string.", "user")


def _stream_options(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous usage); continuous needs include_usage, as in vLLM."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not stream:
        raise BadRequest("'stream_options' is only allowed when 'stream' is true.",
                         "stream_options")
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object.", "stream_options")
    include = options.get("include_usage") or False
    continuous = options.get("continuous_usage_stats") or False
    if not isinstance(include, bool) or not isinstance(continuous, bool):
        raise BadRequest("'stream_options' fields must be booleans.", "stream_options")
    return stream, include, include and continuous


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return text.content_text(message.get("content"))
    return ""


def _directives(prompt: str, settings: config.Settings, param: str) -> tuple[int, float]:
    """(target tokens, delay_ms) for a prompt: its directives, else the settings."""
    try:
        tokens, delay_ms = text.directives(prompt)
    except ValueError as exc:
        raise BadRequest(str(exc), param) from None
    return (settings.default_tokens if tokens is None else tokens,
            settings.token_delay_ms if delay_ms is None else delay_ms)


def _lie(prompt: str, settings: config.Settings, param: str, stream: bool = False) -> misbehave.Misbehaviour:
    """The test-only misbehaviour a prompt asks for; none unless TOKENS_BACKEND_MISBEHAVE is set."""
    if not settings.misbehave:
        return misbehave.NONE
    try:
        lie = misbehave.read(prompt)
    except ValueError as exc:
        raise BadRequest(str(exc), param) from None
    if lie.forever and not stream:
        raise BadRequest("[[forever=...]] needs \"stream\": true.", param)
    return lie


def _misbehaving(lie: misbehave.Misbehaviour, target: int, delay_ms: float,
                 max_tokens: int | None) -> tuple[int, float, int | None]:
    """(target, delay_ms, max_tokens) once the lie is applied."""
    if lie.ignore_max_tokens:
        max_tokens = None
    if lie.forever:
        target = FOREVER_TOKENS
        delay_ms = max(delay_ms, misbehave.FOREVER_PACE_MS)
    return target, delay_ms, max_tokens


# ---- generation ---------------------------------------------------------------------


class _Pacer:
    """Sleeps until the next token is due; a late step starts a fresh schedule, never a burst."""

    __slots__ = ("_delay_s", "_due_s", "_loop")

    def __init__(self, delay_ms: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._delay_s = delay_ms / 1000
        self._due_s = self._loop.time()

    async def wait(self) -> None:
        now_s = self._loop.time()
        self._due_s = max(self._due_s + self._delay_s, now_s)
        await asyncio.sleep(self._due_s - now_s)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _unary(job: Job, stats: Stats) -> web.Response:
    if job.delay_ms > 0:
        pieces = await _paced_pieces(job, stats)
    else:
        pieces = [choice.drain() for choice in job.choices]
        stats.tokens_generated += sum(map(len, pieces))
    return _json(_unary_payload(job, ["".join(p) for p in pieces], sum(map(len, pieces))))


async def _paced_pieces(job: Job, stats: Stats) -> list[list[str]]:
    """Every choice advances one token per period, as a batching engine would."""
    pieces: list[list[str]] = [[] for _ in job.choices]
    live = list(enumerate(job.choices))
    pacer = _Pacer(job.delay_ms)
    while live:
        for i, choice in live:
            piece = choice.next_piece()
            if piece is not None:
                pieces[i].append(piece)
                stats.tokens_generated += 1
        live = [(i, choice) for i, choice in live if not choice.done]
        if live:
            await pacer.wait()
    return pieces


def _unary_payload(job: Job, contents: list[str], completion_tokens: int) -> dict:
    if job.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": content},
                    "logprobs": None, "finish_reason": choice.finish_reason}
                   for i, (choice, content) in enumerate(zip(job.choices, contents))]
    else:
        choices = [{"index": i, "text": content, "logprobs": None,
                    "finish_reason": choice.finish_reason}
                   for i, (choice, content) in enumerate(zip(job.choices, contents))]
    return {"id": _new_id(job.chat), "object": "chat.completion" if job.chat else "text_completion",
            "created": int(time.time()), "model": job.model, "choices": choices,
            "usage": _usage(*(job.lie.usage or (job.prompt_tokens, completion_tokens)))}


def _new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{_ID_PREFIX}{next(_ids):x}"


class _Frames:
    """Builds SSE events from a fixed per-stream head, so a token costs one small f-string."""

    __slots__ = ("_head", "_chat", "_prompt_tokens", "_usage_mode", "_lie")

    def __init__(self, job: Job) -> None:
        kind = "chat.completion.chunk" if job.chat else "text_completion"
        self._head = (f'data: {{"id":"{_new_id(job.chat)}","object":"{kind}",'
                      f'"created":{int(time.time())},"model":{json.dumps(job.model)},"choices":[')
        self._chat = job.chat
        self._prompt_tokens = job.prompt_tokens
        self._lie = job.lie.usage
        self._usage_mode = ("continuous" if job.continuous_usage
                            else "null" if job.include_usage else "none")

    def piece(self, index: int, piece: str, first: bool, completion_tokens: int) -> str:
        content = json.dumps(piece)
        if not self._chat:
            body = f'"text":{content}'
        elif first:
            body = f'"delta":{{"role":"assistant","content":{content}}}'
        else:
            body = f'"delta":{{"content":{content}}}'
        return self._event(index, body, "null", completion_tokens)

    def finish(self, index: int, reason: str, completion_tokens: int) -> str:
        body = '"delta":{}' if self._chat else '"text":""'
        return self._event(index, body, f'"{reason}"', completion_tokens)

    def usage(self, completion_tokens: int) -> str:
        return f'{self._head}],"usage":{self._usage_json(completion_tokens)}}}\n\n'

    def _event(self, index: int, body: str, reason: str, completion_tokens: int) -> str:
        choice = f'{{"index":{index},{body},"logprobs":null,"finish_reason":{reason}}}'
        if self._usage_mode == "none":
            return f"{self._head}{choice}]}}\n\n"
        if self._usage_mode == "null":
            return f'{self._head}{choice}],"usage":null}}\n\n'
        return f'{self._head}{choice}],"usage":{self._usage_json(completion_tokens)}}}\n\n'

    def empty(self, index: int) -> str:
        """A chunk that carries nothing: an empty delta, no finish."""
        return self._event(index, '"delta":{}' if self._chat else '"text":""', "null", 0)

    def _usage_json(self, completion_tokens: int) -> str:
        prompt_tokens = self._prompt_tokens
        if self._lie is not None:
            prompt_tokens, completion_tokens = self._lie
        return (f'{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion_tokens},'
                f'"total_tokens":{prompt_tokens + completion_tokens}}}')


async def _stream(request: web.Request, job: Job, stats: Stats) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    stats.streams_started += 1
    try:
        if job.lie.forever in ("empty", "keepalive"):
            await _pump_nothing(response, job)
        else:
            await _pump(response, job, stats)
    except asyncio.CancelledError:
        stats.streams_cancelled += 1  # handler cancellation: the client went away
        raise
    except ConnectionError:
        stats.streams_cancelled += 1  # a write found the connection already closed
        return response
    stats.streams_completed += 1
    return response


async def _pump(response: web.StreamResponse, job: Job, stats: Stats) -> None:
    frames = _Frames(job)
    pacer = _Pacer(job.delay_ms) if job.delay_ms > 0 else None
    started = [False] * len(job.choices)
    live = list(enumerate(job.choices))
    events: list[str] = []
    completion_tokens = 0
    while live:
        for i, choice in live:
            piece = choice.next_piece()
            if piece is not None:
                completion_tokens += 1
                stats.tokens_generated += 1
                events.append(frames.piece(i, piece, not started[i], completion_tokens))
                started[i] = True
            elif job.chat and not started[i]:
                # A chat choice with no text still announces its role once.
                events.append(frames.piece(i, "", True, completion_tokens))
                started[i] = True
            if choice.done:
                events.append(frames.finish(i, choice.finish_reason, completion_tokens))
        live = [(i, choice) for i, choice in live if not choice.done]
        if live and pacer is not None:
            await _flush(response, events)
            await pacer.wait()
        elif len(events) >= _FLUSH_CHUNKS:
            await _flush(response, events)
            await asyncio.sleep(0)
    if job.include_usage:
        events.append(frames.usage(completion_tokens))
    events.append(_DONE)
    await _flush(response, events)
    await response.write_eof()


async def _pump_nothing(response: web.StreamResponse, job: Job) -> None:
    """A stream that never ends and never says anything (misbehave's forever=empty|keepalive)."""
    frames = _Frames(job)
    pacer = _Pacer(job.delay_ms)
    if job.chat:
        await _flush(response, [frames.piece(i, "", True, 0) for i in range(len(job.choices))])
    while True:  # ends: the client leaves (handler cancellation)
        if job.lie.forever == "keepalive":
            await response.write(b": keep-alive\n\n")
        else:
            await _flush(response, [frames.empty(i) for i in range(len(job.choices))])
        await pacer.wait()


async def _flush(response: web.StreamResponse, events: list[str]) -> None:
    await response.write("".join(events).encode())
    events.clear()


# ---- media: images, video, speech, transcription ------------------------------------


def _refusals(handler):
    """Turns the refusals of a media handler into OpenAI's error shape."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(exc)
        except media.Invalid as exc:
            return _error(BadRequest(str(exc), exc.param, exc.status, exc.code, exc.kind))

    return wrapped


def _not_found(message: str, code: str) -> BadRequest:
    return BadRequest(message, None, 404, code)


async def _read_form(request: web.Request, body_bytes_max: int = BODY_BYTES_MAX,
                     file_field: str | None = None, file_bytes_max: int = 0
                     ) -> tuple[dict, bytes | None]:
    """(text fields, the bytes of file_field or None) of a multipart form; other files are dropped.

    A field sent more than once (such as timestamp_granularities[]) becomes a list.
    """
    if request.content_type != "multipart/form-data":
        raise BadRequest("The request body must be multipart/form-data.")
    too_large = BadRequest(f"Request body is larger than {body_bytes_max} bytes.", status=413,
                           code="request_too_large")
    if (request.content_length or 0) > body_bytes_max:
        raise too_large
    try:
        form = await request.clone(client_max_size=body_bytes_max).post()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except (ValueError, web.HTTPException):  # a malformed form, or too many fields
        raise BadRequest("The request body is not a valid multipart form.") from None
    fields: dict[str, object] = {}
    upload = None
    try:
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if name == file_field and upload is None:
                    upload = await asyncio.to_thread(value.file.read, file_bytes_max + 1)
                continue
            if not isinstance(value, str):
                try:
                    value = bytes(value).decode()
                except UnicodeDecodeError:
                    raise BadRequest(f"Form field '{name}' is not UTF-8 text.", name) from None
            held = fields.get(name)
            fields[name] = value if held is None else [*(held if isinstance(held, list)
                                                        else [held]), value]
    finally:
        for value in form.values():
            if isinstance(value, web.FileField):
                value.file.close()
    if upload is not None and len(upload) > file_bytes_max:
        raise BadRequest(f"The file is larger than {file_bytes_max} bytes.", file_field, 413,
                         "file_too_large")
    _record(request, {**fields, **({file_field: f"<{len(upload)} bytes>"} if upload is not None else {})})
    return fields, upload


@_refusals
async def _images_generations(request: web.Request) -> web.Response:
    ask = images.parse(await _read_body(request))
    count = _lie(ask.prompt, request.app[SETTINGS], "prompt").images
    pngs = await asyncio.gather(*(_png(request.app, ask, i) for i in range(ask.n if count is None else count)))
    if ask.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(png).decode()} for png in pngs]
    else:
        files = request.app[IMAGE_FILES]
        data = []
        for png in pngs:
            image_id = secrets.token_urlsafe(16)
            files.put(image_id, png)
            data.append({"url": f"{request.scheme}://{request.host}{IMAGE_FILES_PATH}"
                                f"{image_id}.png"})
    request.app[STATS].images_generated += len(pngs)
    return _json({"created": int(time.time()), "data": data})


async def _png(app: web.Application, ask: images.ImageRequest, index: int) -> bytes:
    key = (ask.model, ask.prompt, ask.size, index)
    png = app[IMAGE_CACHE].get(key)
    if png is None:
        png = await asyncio.to_thread(images.render_png, ask.model, ask.prompt, ask.size, index)
        app[IMAGE_CACHE].put(key, png)
    return png


@_refusals
async def _image_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    png = request.app[IMAGE_FILES].get(name.removesuffix(".png")) if name.endswith(".png") else None
    if png is None:
        raise _not_found(f"No such image; URLs are kept for the latest {IMAGE_FILES_MAX} images.",
                         "image_not_found")
    return web.Response(body=png, content_type="image/png")


@_refusals
async def _videos_create(request: web.Request) -> web.Response:
    if request.content_type == "multipart/form-data":
        fields, _ = await _read_form(request)
    else:
        fields = await _read_body(request)
    job = request.app[VIDEO_JOBS].create(video.parse(fields))
    return _json(job.to_json())


def _video_job(request: web.Request) -> video.Job:
    job = request.app[VIDEO_JOBS].get(request.match_info["video_id"])
    if job is None:
        raise _not_found(f"Video with id '{request.match_info['video_id']}' not found.",
                         "video_not_found")
    return job


@_refusals
async def _videos_retrieve(request: web.Request) -> web.Response:
    job = _video_job(request)
    response = _json(job.to_json())
    if not job.finished:
        response.headers["openai-poll-after-ms"] = _POLL_AFTER_MS
    return response


@_refusals
async def _videos_content(request: web.Request) -> web.Response:
    job = _video_job(request)
    if request.query.get("variant", "video") != "video":
        raise BadRequest("Only variant 'video' is available here.", "variant")
    if job.content is None:
        raise _not_found(f"Video '{job.id}' has no content: its status is {job.status}.",
                         "video_not_ready")
    return web.Response(body=job.content, content_type="video/mp4")


def _count_video(stats: Stats, job: video.Job) -> None:
    if job.status == "completed":
        stats.videos_completed += 1
        stats.video_seconds_produced += job.request.seconds
    else:
        stats.videos_failed += 1


async def _close_video_jobs(app: web.Application) -> None:
    await app[VIDEO_JOBS].close()


@_refusals
async def _speech(request: web.Request) -> web.Response:
    ask = speech.parse(await _read_body(request))
    audio = await asyncio.to_thread(speech.speech, ask)
    request.app[STATS].speech_characters += len(ask.input)
    return web.Response(body=audio, content_type=speech.CONTENT_TYPES[ask.response_format])


@_refusals
async def _transcriptions(request: web.Request) -> web.Response:
    fields, upload = await _read_form(request, TRANSCRIPTION_BODY_BYTES_MAX, "file",
                                      transcription.FILE_BYTES_MAX)
    if upload is None:
        raise BadRequest("'file' is required: an audio file in a multipart field named 'file'.",
                         "file")
    ask = transcription.parse(fields)
    decoded = await asyncio.to_thread(transcription.decode, upload)
    body, content_type = transcription.render(ask, decoded)
    request.app[STATS].transcription_ms += decoded.frames * 1000 / decoded.sample_rate
    return web.Response(body=body, headers={"Content-Type": content_type})
