"""A backend that lies, for tests of the gateway only (TOKENS_BACKEND_MISBEHAVE=1).

Off by default: then none of this is read. On, directives in the last user message
(chat), the prompts (completions) or the prompt (images) make the backend misbehave the
way a broken or hostile upstream could, so that tests can show the gateway never pays
for it:

  [[ignore_max_tokens]]      max_tokens and max_completion_tokens are ignored
  [[usage=P,C]]              every usage object reports prompt_tokens P and
                             completion_tokens C (0..1000000000 each), whatever was made
  [[forever=text]]           a stream never ends: words past any cap and target
  [[forever=empty]]          a stream never ends: chunks with an empty delta
  [[forever=keepalive]]      a stream never ends: SSE comment lines, no events
  [[images=N]]               an images call returns N images (0..16), whatever n asked

Forever streams are paced by the request's delay, at least FOREVER_PACE_MS between
two events, so a test stream costs little CPU while the gateway ends it.
"""

import dataclasses
import re

FOREVER_KINDS = ("text", "empty", "keepalive")
USAGE_MAX = 1_000_000_000
IMAGES_MAX = 16
FOREVER_PACE_MS = 10.0

_IGNORE = "[[ignore_max_tokens]]"
_USAGE = re.compile(r"\[\[usage=(\d{1,10}),(\d{1,10})\]\]")
_FOREVER = re.compile(r"\[\[forever=([a-z]+)\]\]")
_IMAGES = re.compile(r"\[\[images=(\d{1,3})\]\]")


@dataclasses.dataclass(frozen=True, slots=True)
class Misbehaviour:
    ignore_max_tokens: bool = False
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens) to report
    forever: str | None = None
    images: int | None = None


NONE = Misbehaviour()


def read(text: str) -> Misbehaviour:
    """The directives in `text`; ValueError for one out of range."""
    if "[[" not in text:
        return NONE
    usage = None
    found = _USAGE.search(text)
    if found:
        usage = int(found.group(1)), int(found.group(2))
        if max(usage) > USAGE_MAX:
            raise ValueError(f"[[usage=P,C]] takes 0..{USAGE_MAX} each")
    forever = None
    found = _FOREVER.search(text)
    if found:
        forever = found.group(1)
        if forever not in FOREVER_KINDS:
            raise ValueError(f"[[forever=...]] is one of {', '.join(FOREVER_KINDS)}")
    images = None
    found = _IMAGES.search(text)
    if found:
        images = int(found.group(1))
        if images > IMAGES_MAX:
            raise ValueError(f"[[images=N]] takes 0..{IMAGES_MAX}")
    # Words past every cap are the point of forever=text.
    ignore = _IGNORE in text or forever == "text"
    return Misbehaviour(ignore_max_tokens=ignore, usage=usage, forever=forever, images=images)
