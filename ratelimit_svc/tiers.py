"""The one table of rate-limit tiers; docs and every service read it from here."""
import dataclasses

# Every limit is counted over any sliding window of this many seconds.
WINDOW_S = 60


@dataclasses.dataclass(frozen=True)
class Tier:
    name: str
    title: str
    requests_per_minute: int


FREE = Tier("free", "Free (default on signup)", 10)
ELEVATED = Tier("elevated", "Elevated (approved users)", 60)
PAID = Tier("paid", "Paid", 300)

# In ascending order of limit, as the public docs list them.
TIERS: tuple[Tier, ...] = (FREE, ELEVATED, PAID)
DEFAULT = FREE
HIGHEST = max(TIERS, key=lambda tier: tier.requests_per_minute)
LIMIT_MAX = HIGHEST.requests_per_minute

_BY_NAME = {tier.name: tier for tier in TIERS}


def lookup(name: str) -> Tier:
    """The tier called `name`; anything unknown (or empty) counts as Free, the
    strictest, so a typo or a new tier name never grants more than a signup."""
    tier = _BY_NAME.get(name)
    if tier is None:
        tier = _BY_NAME.get(name.strip().lower(), DEFAULT)
    return tier
