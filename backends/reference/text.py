"""Deterministic text for the reference backend: the token rule and the word generator.

Input tokens (prompt_tokens)
  A word is a maximal run of non-whitespace, as str.split() finds it.
  The text of a message is its content when that is a string, or the "text" of
  each content part whose type is "text" (other parts, such as images, count
  nothing here: parts.py counts them; a null content counts nothing).
    chat:        sum over messages of (words in its text + 4), plus 3
    completions: words in all prompts, plus 1
  Every word holds at least one UTF-8 byte, so always
    prompt_tokens <= UTF-8 bytes of all text + 8 per message (or prompt) + 8,
  the worst case the ledger holds before a request runs.

Output (completion_tokens)
  Words are drawn from VOCABULARY by a random.Random seeded with
  (model, prompt text, seed, choice index); one word is one token. The first
  piece is a bare word, every later piece is " " + word, so a stream's chunks
  join to exactly the unary content. The i-th word does not depend on the
  length asked for, so a shorter answer is a prefix of a longer one.
  Length: the target (the default, or [[tokens=N]] in the last user message /
  prompt, 0..100000) capped by max_tokens; finish_reason is "length" when the
  cap cut it short, else "stop". [[delay_ms=N]] (0..60000) overrides the
  per-token delay for the request.
  Stop strings: the text is cut just before the first stop string found while
  generating, finish_reason "stop"; the piece holding the cut may be a partial
  word, and it still counts as one token. Pieces are held back only as long as
  a stop string could still begin in them.
"""

import collections
import hashlib
import random
import re

TOKENS_MAX = 100_000
DELAY_MS_MAX = 60_000
# Draw words in batches: one rng.choices call per batch costs far less than a call per word.
_BATCH = 64

VOCABULARY = tuple(
    """
    the a an and or but so because when while after before until since if then
    than as of in on at by for with without about above below under over into
    onto from to through across along around near far here there now today
    tomorrow yesterday always never often sometimes soon later early late
    time day night morning evening week month year moment hour minute
    people person child friend family teacher doctor farmer driver writer
    city town village river mountain valley forest garden field road bridge
    house home room door window table chair kitchen school office market
    water fire air earth stone wood paper glass metal bread apple coffee tea
    light sound voice music story book letter word number picture idea plan
    question answer reason problem result example system process method
    good new old great small large long short high low big little young
    soft bright dark warm cold quiet loud simple clear careful quick slow
    happy calm strong gentle open full empty true real ready easy hard
    is was are were be been has have had do does did can could will would
    should may might must make made take took give gave find found keep kept
    go went come came see saw know knew think thought say said tell told
    ask asked work worked call called try tried move moved live lived
    bring brought begin began write wrote read build built learn learned
    walk walked carry carried hold held turn turned show showed follow
    """.split()
)
_SPACED = tuple(" " + word for word in VOCABULARY)

_TOKENS_RE = re.compile(r"\[\[tokens=(\d{1,9})\]\]")
_DELAY_RE = re.compile(r"\[\[delay_ms=(\d{1,9})\]\]")


def content_text(content: object) -> str:
    """The text of one message's content; parts are joined by a newline so each counts apart."""
    if isinstance(content, str):
        return content
    if not content:
        return ""
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def chat_prompt_tokens(messages: list[dict]) -> int:
    """prompt_tokens of a chat request (see the module docstring)."""
    words = sum(len(content_text(message.get("content")).split()) for message in messages)
    return words + 4 * len(messages) + 3


def completion_prompt_tokens(prompts: list[str]) -> int:
    """prompt_tokens of a completions request (see the module docstring)."""
    return sum(len(prompt.split()) for prompt in prompts) + 1


def chat_seed_text(messages: list[dict]) -> str:
    """The whole conversation as one string, so every role and word feeds the seed."""
    return "\x1e".join(f"{m['role']}\x1f{content_text(m.get('content'))}" for m in messages)


def directives(text: str) -> tuple[int | None, int | None]:
    """([[tokens=N]], [[delay_ms=N]]) found in text, None when absent; ValueError when out of range."""
    tokens = _directive(_TOKENS_RE, text, TOKENS_MAX, "tokens")
    delay_ms = _directive(_DELAY_RE, text, DELAY_MS_MAX, "delay_ms")
    return tokens, delay_ms


def _directive(pattern: re.Pattern, text: str, value_max: int, name: str) -> int | None:
    if "[[" not in text:  # the usual prompt has none; skip the regex
        return None
    found = pattern.search(text)
    if found is None:
        return None
    value = int(found.group(1))
    if value > value_max:
        raise ValueError(f"[[{name}=N]] must be between 0 and {value_max}")
    return value


def seed_base(model: str, prompt_text: str, seed: int | None) -> str:
    """A short digest of everything but the choice index; hashing once keeps n > 1 cheap."""
    key = f"{model}\x00{seed}\x00{prompt_text}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(key, digest_size=16).hexdigest()


class Choice:
    """One choice's output, produced one piece (one token) at a time by next_piece()."""

    __slots__ = ("_rng", "_left", "_batch", "_first", "_stops", "_span",
                 "_pending", "_window", "_end_reason", "finish_reason", "done")

    def __init__(self, base: str, index: int, target: int, max_tokens: int | None,
                 stops: tuple[str, ...] = ()) -> None:
        capped = max_tokens is not None and max_tokens < target
        self._rng = random.Random(f"{base}:{index}")
        self._left = max_tokens if capped else target
        self._batch: list[str] = []
        self._first = True
        self._stops = stops
        self._span = max(map(len, stops), default=0)
        self._pending: collections.deque[str] = collections.deque()
        self._window = ""  # the pending pieces joined: where a stop string may still be found
        self._end_reason = "length" if capped else "stop"
        self.finish_reason: str | None = None
        self.done = False
        if self._left == 0:
            self._finish()

    def next_piece(self) -> str | None:
        """The next piece of text, or None when there is none; `done` turns true with the last."""
        if self.done:
            return None
        if not self._stops:
            piece = self._word()
            if self._left == 0:
                self._finish()
            return piece
        return self._next_checked()

    def drain(self) -> list[str]:
        """Every remaining piece at once, for unpaced unary calls; the same text as next_piece()."""
        if self._stops or self.done:
            pieces = []
            while (piece := self.next_piece()) is not None:  # bounded by _left and _pending
                pieces.append(piece)
            return pieces
        # The batch holds words already drawn (reversed); draw the rest in one call.
        pieces = self._batch[::-1] + self._rng.choices(_SPACED, k=self._left - len(self._batch))
        if self._first:
            pieces[0] = pieces[0][1:]
            self._first = False
        self._batch = []
        self._left = 0
        self._finish()
        return pieces

    def _finish(self) -> None:
        self.done = True
        self.finish_reason = self._end_reason

    def _word(self) -> str:
        if not self._batch:
            self._batch = self._rng.choices(_SPACED, k=min(self._left, _BATCH))
            self._batch.reverse()  # so pop() hands them out in drawing order
        self._left -= 1
        piece = self._batch.pop()
        if self._first:
            self._first = False
            return piece[1:]
        return piece

    def _next_checked(self) -> str | None:
        # Bounded: each pass either returns or draws one word, and _left counts down.
        while True:
            if self._pending and (self._left == 0 or self._settled()):
                piece = self._pending.popleft()
                self._window = self._window[len(piece):]
                if not self._pending and self._left == 0:
                    self._finish()
                return piece
            if self._left == 0:
                self._finish()
                return None
            self._push(self._word())

    def _settled(self) -> bool:
        """True once every stop string that could start in the oldest pending piece would be visible."""
        return len(self._window) - len(self._pending[0]) >= self._span - 1

    def _push(self, piece: str) -> None:
        self._pending.append(piece)
        self._window += piece
        found = [at for at in map(self._window.find, self._stops) if at >= 0]
        if not found:
            return
        cut = min(found)
        kept: list[str] = []
        start = 0
        for held in self._pending:
            if start >= cut:
                break
            kept.append(held[:cut - start])
            start += len(held)
        self._pending = collections.deque(kept)
        self._window = self._window[:cut]
        self._left = 0
        self._end_reason = "stop"
