"""x-ts-held: what ledger_svc held for a call, in usage units, so router_svc keeps the call within it.

Format: "model=<id>,<unit>=<count>[,<unit>=<count>...]": the model whose prices the hold
was taken at, and every unit its worst case covers (common.pricing.USAGE_FIELDS; a text
call's input_tokens and output_tokens, a media call's one unit: catalog.USAGE_UNITS).
ledger_svc writes it after admitting a call (encode); router_svc reads it (Held.parse)
to size what it asks of the backend and to cut, or refuse, anything beyond it. Envoy
removes any x-ts-* header a client sends, so only the ledger can set it.
"""
import dataclasses
from collections.abc import Mapping

from common import pricing

HEADER = "x-ts-held"
_COUNT_DIGITS_MAX = 19  # an int64's worth: the ledger stores units as BIGINT


def encode(model_id: str, units: Mapping[str, int]) -> str:
    return ",".join([f"model={model_id}", *(f"{unit}={count}" for unit, count in units.items())])


@dataclasses.dataclass(frozen=True)
class Held:
    model: str
    units: Mapping[str, int]

    def get(self, unit: str) -> int | None:
        """The held count of `unit`; None when the hold does not bound it."""
        return self.units.get(unit)

    @classmethod
    def parse(cls, header: str) -> "Held | None":
        """The header's hold; None when it is absent or not in this format (then nothing is
        known of the hold, and the caller must not assume a bound it cannot read)."""
        if not header:
            return None
        model, units = "", {}
        for part in header.split(","):
            name, _, count = part.partition("=")
            if name == "model" and not model:
                model = count
            elif (name in pricing.USAGE_FIELDS and name not in units and count.isascii() and count.isdigit()
                  and len(count) <= _COUNT_DIGITS_MAX):
                units[name] = int(count)
            else:
                return None
        return cls(model, units) if model and units else None
