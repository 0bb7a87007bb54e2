"""What a text call may ask of a backend and be charged: the cap it sends, and the cut at the hold.

Pure: no grpc, HTTP or SQL. ledger_svc held the call's worst case and says what it held
in x-ts-held (common.held): its input tokens, and output tokens for every choice the
backend generates (n; for completions n per prompt, best_of when larger), each up to
one cap. The router sends the backend that per-choice cap (never more than the caller
asked for, or the model's max_output_tokens), and whatever the backend then does, the
call never forwards or is charged more than the hold:

- unary: choices beyond those asked for are dropped, and the usage charged is the
  backend's report cut at the held input and output tokens;
- streams: a choice that reaches its cap ends there with finish_reason "length";
  the whole stream ends (each open choice with "length") once the output, counted
  a token per chunk that carries any, or as the backend reports it, reaches the held
  output, or once the backend has sent more events than that output can take (a
  stream of empty deltas); what is charged is cut the same way.

Every cut is an overrun: a backend that returned more than was held. The caller logs
and counts each (router_svc.metrics.OVERRUNS, per backend and unit).
"""
import dataclasses
import math

from common import errors, held as held_mod

# Events a stream may carry besides one per output token: a role chunk and a finish
# chunk per choice, the usage chunk, and a few a backend may add (vLLM's first empty one).
EVENTS_PER_CHOICE = 4
EVENTS_SLACK = 16
# A count a backend reports that is not a whole number >= 0 counts as this many.
_TOKENS_MAX = 2**62


@dataclasses.dataclass(frozen=True)
class Caps:
    """What one text call may produce: `per_choice` output tokens for each of `choices`
    generated choices (`returned` of them reach the client), within the held tokens
    (None: no hold header, as in a benchmark of the ledger hop; then no cut)."""

    per_choice: int
    choices: int
    returned: int
    input_tokens: int | None = None
    output_tokens: int | None = None

    def charge(self, input_tokens: int, output_tokens: int) -> tuple[int, int, list[str]]:
        """(input, output) to charge for what the backend reports, and the units it overran."""
        over = []
        if self.input_tokens is not None and input_tokens > self.input_tokens:
            input_tokens = self.input_tokens
            over.append("input_tokens")
        if self.output_tokens is not None and output_tokens > self.output_tokens:
            output_tokens = self.output_tokens
            over.append("output_tokens")
        return input_tokens, output_tokens, over


def caps(held: held_mod.Held | None, model_id: str, requested: int | None, model_cap: int, choices: int,
         returned: int) -> Caps:
    """The caps of a call asking for `requested` output tokens per choice (None: the model's
    `model_cap`), `choices` generated and `returned` to the client, under the hold `held`."""
    per_choice = requested or model_cap
    if held is None or held.get("output_tokens") is None:
        return Caps(per_choice, choices, returned)
    if held.model != model_id:
        raise errors.InvalidRequest(f"The gateway held this call for `{held.model}`, not `{model_id}`.",
                                    param="model", code="model_mismatch")
    output = held.get("output_tokens")
    per_choice = min(per_choice, output // max(choices, 1))
    if per_choice < 1:
        raise errors.InvalidRequest("The call's hold does not cover one output token per choice.", param=None,
                                    code="exceeds_hold")
    return Caps(per_choice, choices, returned, held.get("input_tokens"), output)


def tokens(value) -> int:
    """A token count as a backend reported it, as a whole number >= 0 (anything else: 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            return 0
        value = int(value)
    return min(max(value, 0), _TOKENS_MAX)


def unary(caps_: Caps, result: dict) -> tuple[int, int, list[str]]:
    """Cuts a backend's whole answer to the call: choices beyond those asked for are dropped.
    Returns the (input, output) tokens to charge and the units the backend overran."""
    over = []
    choices = result.get("choices")
    if isinstance(choices, list) and len(choices) > caps_.returned:
        result["choices"] = choices[:caps_.returned]
        over.append("choices")
    usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
    input_tokens, output_tokens, cut = caps_.charge(tokens(usage.get("prompt_tokens")),
                                                    tokens(usage.get("completion_tokens")))
    return input_tokens, output_tokens, over + cut


def _carries_output(choice: dict) -> bool:
    """A streamed choice that holds any generated output: text, a delta's content, reasoning,
    a refusal or tool calls (a role or an empty delta alone is none)."""
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and any(value for key, value in delta.items() if key != "role")


class StreamMeter:
    """Follows a stream's events and says what of each to forward, and when to end it."""

    def __init__(self, caps_: Caps) -> None:
        self.caps = caps_
        self.counted: dict[int, int] = {}
        # Choices the backend finished, or that were cut here.
        self.ended: set[int] = set()
        self.reported_input = 0
        self.reported_output = 0
        self.events = 0
        output = caps_.output_tokens if caps_.output_tokens is not None else caps_.per_choice * caps_.choices
        self.events_max = output + EVENTS_PER_CHOICE * caps_.choices + EVENTS_SLACK
        # Units the backend overran (a stream past the hold ends: `done`).
        self.over: list[str] = []
        self.done = False

    def take(self, event: dict) -> tuple[dict | None, list[int]]:
        """(the event to forward, without its usage and any choice past its cap, or None;
        the choices cut by this event, to end with finish_reason "length"). After it,
        `done` says the stream must end here, every choice still open with "length"."""
        self.events += 1
        if self.events > self.events_max:
            return self._end("events")
        usage = event.pop("usage", None)
        if isinstance(usage, dict):
            self.reported_input = tokens(usage.get("prompt_tokens"))
            self.reported_output = tokens(usage.get("completion_tokens"))
        choices = event.get("choices")
        if not isinstance(choices, list):
            return (event if not choices else None), []
        kept, cut = [], []
        for choice in choices:
            index = choice.get("index", 0) if isinstance(choice, dict) else -1
            if not isinstance(index, int) or not 0 <= index < self.caps.returned:
                self._overran("choices")
                continue
            if index in self.ended:
                continue
            if _carries_output(choice):
                self.counted[index] = self.counted.get(index, 0) + 1
                if self.counted[index] > self.caps.per_choice:
                    self.ended.add(index)
                    cut.append(index)
                    self._overran("output_tokens")
                    continue
            if choice.get("finish_reason"):
                self.ended.add(index)
            kept.append(choice)
        held = self.caps.output_tokens
        if held is not None and max(self.reported_output, sum(self.counted.values())) > held:
            return None, self._end("output_tokens")[1] + cut
        if cut and len(self.ended) >= self.caps.returned:
            self.done = True
        if choices and not kept:
            return None, cut
        event["choices"] = kept
        return event, cut

    def _end(self, unit: str) -> tuple[None, list[int]]:
        self._overran(unit)
        self.done = True
        return None, []

    def _overran(self, unit: str) -> None:
        if unit not in self.over:
            self.over.append(unit)

    def open_choices(self) -> list[int]:
        """The choices not yet finished: a stream ended here ends each with "length"."""
        return [index for index in range(self.caps.returned) if index not in self.ended]

    def charge(self) -> tuple[int, int, list[str]]:
        """(input, output) tokens to charge for the stream so far, and the units it overran."""
        output = max(self.reported_output, sum(self.counted.values()))
        input_tokens, output_tokens, cut = self.caps.charge(self.reported_input, output)
        return input_tokens, output_tokens, [*self.over, *(u for u in cut if u not in self.over)]
