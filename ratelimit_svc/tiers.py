"""The one table of rate-limit tiers; docs and every service read it from here."""
import dataclasses

# Every limit is counted over any sliding window of this many seconds.
WINDOW_S = 60


# A key revoked this long ago or less still counts toward its account's maximum of live
# keys (a second more than the window, as revocations are kept in whole seconds): its
# window may still admit calls, so a revoke-and-create cycle never gives a fresh one.
REVOKED_COUNTS_S = WINDOW_S + 1


@dataclasses.dataclass(frozen=True)
class Tier:
    name: str
    title: str
    requests_per_minute: int
    # Live keys an account may hold at this tier: with the per-key limit, the most an
    # account can call in any window is keys_max x requests_per_minute.
    keys_max: int


FREE = Tier("free", "Free (default on signup)", 10, 3)
ELEVATED = Tier("elevated", "Elevated (approved users)", 60, 10)
PAID = Tier("paid", "Paid", 300, 50)

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
