"""The model catalog: which models exist, their type, backends, limits and list prices.

One YAML file (TOKENS_CATALOG, default catalog.yaml at the repo root) read by
router_svc (routes and limits) and ledger_svc (which seeds its versioned price
table from the list prices). Backend URLs may use ${VAR:-default}.
"""
import dataclasses
import os
import pathlib
import re

import yaml

from common import errors, pricing

ROOT = pathlib.Path(__file__).resolve().parent.parent
TYPES = ("text", "image", "video", "tts", "stt")
# Which price units make sense for each model type.
TYPE_UNITS = {
    "text": ("input_per_million_tokens", "output_per_million_tokens"),
    "image": ("per_image",),
    "video": ("per_second",),
    "tts": ("per_character",),
    "stt": ("per_minute",),
}
LIMIT_NAMES = ("context_window", "max_output_tokens", "max_images", "max_video_seconds",
               "max_input_characters", "max_audio_seconds")
# Media limits a catalog entry leaves out (OpenAI's and the reference backend's). ledger_svc
# holds up to them and router_svc refuses beyond them, so both read them from here.
IMAGES_MAX = 10
VIDEO_SECONDS_DEFAULT, VIDEO_SECONDS_MAX = 4, 20
CHARACTERS_MAX = 4096
AUDIO_SECONDS_MAX = 7200
# The usage units each model type is metered in (x-ts-held names them).
USAGE_UNITS = {kind: tuple(pricing.UNITS[unit][0] for unit in units) for kind, units in TYPE_UNITS.items()}
# Chat content parts that cost input tokens. A text model's `inputs` names the ones it
# accepts and what each holds; any other part type is refused (400) before it is held.
PART_TYPES = ("image_url", "input_audio", "file")
# The keys of each part type's rule: tokens_each (a fixed bound per part: for images, the
# most tokens one image can become), tokens_per_second (audio, on the duration of its data:
# a WAV or FLAC header, else common.audio's size bound), tokens_per_byte (a file, on its
# decoded size), max_bytes (the largest data the part may carry, decoded).
RULE_KEYS = {
    "image_url": ("tokens_each", "max_bytes"),
    "input_audio": ("tokens_per_second", "max_bytes"),
    "file": ("tokens_per_byte", "tokens_each", "max_bytes"),
}
PART_BYTES_MAX = 20 * 1024 * 1024
_RULE_VALUE_MAX = 10**9
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


class CatalogError(SystemExit):
    def __init__(self, path: pathlib.Path, problem: str) -> None:
        super().__init__(f"catalog {path}: {problem}")


@dataclasses.dataclass(frozen=True)
class Backend:
    url: str
    model: str
    api_key: str = ""
    # The backend reports cumulative usage on every streamed chunk (vLLM's
    # stream_options.continuous_usage_stats), so an abandoned stream is billed
    # from its own count rather than from counted chunks.
    continuous_usage: bool = False


@dataclasses.dataclass(frozen=True)
class InputRule:
    """What one content part type holds in input tokens (see RULE_KEYS)."""

    tokens_each: int = 0
    tokens_per_second: int = 0
    tokens_per_byte: int = 0
    max_bytes: int = PART_BYTES_MAX


@dataclasses.dataclass(frozen=True)
class Model:
    id: str
    type: str
    owned_by: str
    created: int
    backends: tuple[Backend, ...]
    limits: dict[str, int]
    pricing: dict[str, str]
    # Extra per-type options (sizes, voices, formats...), passed through as given.
    options: dict
    # Content part type -> its rule; a text model accepts text parts and these only.
    inputs: dict[str, InputRule] = dataclasses.field(default_factory=dict)

    def limit(self, name: str, default: int) -> int:
        return self.limits.get(name, default)

    def prices_nanos(self) -> dict[str, int]:
        return pricing.parse_prices(self.pricing)

    def input_rule(self, kind: str, where: str) -> InputRule:
        """The rule of a content part of type `kind`, or the 400 refusing it (param `where`)."""
        rule = self.inputs.get(kind)
        if rule is None:
            accepted = ", ".join(["text", *self.inputs])
            raise errors.InvalidRequest(f"{where}: the model `{self.id}` does not accept content parts of type "
                                        f"{kind!r} (it accepts {accepted})", param=where,
                                        code="unsupported_content_part")
        return rule


@dataclasses.dataclass(frozen=True)
class Catalog:
    models: dict[str, Model]
    path: pathlib.Path

    def get(self, model_id: str) -> Model | None:
        return self.models.get(model_id)


def default_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TOKENS_CATALOG", str(ROOT / "catalog.yaml")))


def _expand(text: str) -> str:
    return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), text)


def load(path: pathlib.Path | None = None) -> Catalog:
    path = pathlib.Path(path or default_path())
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CatalogError(path, str(error)) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise CatalogError(path, "expected a mapping with a list under 'models'")
    models = {}
    for index, entry in enumerate(raw["models"]):
        model = _model(path, index, entry)
        if model.id in models:
            raise CatalogError(path, f"model {model.id!r} is listed twice")
        models[model.id] = model
    return Catalog(models=models, path=path)


def _model(path: pathlib.Path, index: int, entry: dict) -> Model:
    where = f"models[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        raise CatalogError(path, f"{where}: needs an 'id'")
    kind = entry.get("type")
    if kind not in TYPES:
        raise CatalogError(path, f"{where} ({entry['id']}): type must be one of {', '.join(TYPES)}")
    backends = []
    for b in entry.get("backends") or []:
        if not isinstance(b, dict) or not b.get("url"):
            raise CatalogError(path, f"{where}: every backend needs a 'url'")
        key_env = b.get("api_key_env") or ""
        backends.append(Backend(url=_expand(str(b["url"])).rstrip("/"), model=str(b.get("model") or entry["id"]),
                                api_key=os.environ.get(key_env, "") if key_env else "",
                                continuous_usage=bool(b.get("continuous_usage", False))))
    if not backends:
        raise CatalogError(path, f"{where} ({entry['id']}): needs at least one backend")
    limits = {k: int(v) for k, v in (entry.get("limits") or {}).items()}
    unknown = set(limits) - set(LIMIT_NAMES)
    if unknown:
        raise CatalogError(path, f"{where}: unknown limits {sorted(unknown)}")
    prices = {k: str(v) for k, v in (entry.get("pricing") or {}).items()}
    wrong = set(prices) - set(TYPE_UNITS[kind])
    if wrong or not prices:
        raise CatalogError(path, f"{where}: a {kind} model is priced in {', '.join(TYPE_UNITS[kind])}")
    try:
        pricing.parse_prices(prices)
    except ValueError as error:
        raise CatalogError(path, f"{where}: {error}") from None
    inputs = _inputs(path, f"{where} ({entry['id']})", kind, entry.get("inputs"))
    return Model(id=entry["id"], type=kind, owned_by=str(entry.get("owned_by", "token-service")),
                 created=int(entry.get("created", 1767225600)), backends=tuple(backends),
                 limits=limits, pricing=prices, options=dict(entry.get("options") or {}), inputs=inputs)


def _inputs(path: pathlib.Path, where: str, kind: str, raw) -> dict[str, InputRule]:
    """A text model's content part rules: {part type: {key: whole number >= 1}}."""
    if raw is None:
        return {}
    if kind != "text":
        raise CatalogError(path, f"{where}: only a text model takes 'inputs'")
    if not isinstance(raw, dict):
        raise CatalogError(path, f"{where}: inputs must map part types ({', '.join(PART_TYPES)}) to rules")
    rules = {}
    for part, rule in raw.items():
        if part not in RULE_KEYS:
            raise CatalogError(path, f"{where}: inputs.{part}: not a part type ({', '.join(PART_TYPES)})")
        keys = RULE_KEYS[part]
        if not isinstance(rule, dict) or set(rule) - set(keys):
            raise CatalogError(path, f"{where}: inputs.{part} takes {', '.join(keys)}")
        for key, value in rule.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _RULE_VALUE_MAX:
                raise CatalogError(path, f"{where}: inputs.{part}.{key} must be a whole number from 1 to "
                                         f"{_RULE_VALUE_MAX}, got {value!r}")
        costs = [key for key in keys if key != "max_bytes" and key in rule]
        if len(costs) != 1:
            raise CatalogError(path, f"{where}: inputs.{part} needs exactly one of "
                                     f"{', '.join(k for k in keys if k != 'max_bytes')}")
        if rule.get("max_bytes", 0) > PART_BYTES_MAX:
            raise CatalogError(path, f"{where}: inputs.{part}.max_bytes is at most {PART_BYTES_MAX}")
        rules[part] = InputRule(**rule)
    return rules
