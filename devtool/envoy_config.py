"""Envoy's configuration, generated from the protos and one table of route policy.

The chain (encode order is the reverse):
  errors.lua -> authz_auth -> authz_ratelimit -> transcoder -> authz_ledger -> router
auth and ratelimit see the original request (HTTP/JSON or native gRPC); the
transcoder then turns JSON into the gRPC call, so ledger_svc reads the same
protobuf body from both kinds of caller. Adding a filter is a row here, not a
new shape. Every public method gets two routes: its HTTP binding(s) (read by
the filters before the transcoder) and its gRPC path (read after it, and by
native callers). Internal services (AuthAdmin, Ledger, RateLimitAdmin) have no
route at all.
"""
import dataclasses
import importlib
import json
import pathlib
import re

from google.api import annotations_pb2

from common import errors, tls

ROOT = pathlib.Path(__file__).resolve().parent.parent
LUA = ROOT / "envoy" / "errors.lua"
DESCRIPTOR = ROOT / "gen" / "tokens.pb"
CLUSTERS = ("auth", "ratelimit", "ledger", "router")
MiB = 1024 * 1024
# Proxies in front of Envoy whose x-forwarded-for entries are trusted (TOKENS_XFF_TRUSTED_HOPS):
# 0 when clients connect to Envoy directly (./dev up, the compose file), so that no header
# a client sends can choose its address; 1 behind one load balancer that appends the peer
# it saw, and so on. More than there are proxies lets clients pick their address.
XFF_TRUSTED_HOPS_DEFAULT = 0
LEDGER_PARTIAL_BYTES = 64 * 1024
# Routes buffer a little more than a body may hold, so ledger_svc's filter (which
# reads the whole body) is the one that refuses an oversized body with 413,
# instead of receiving a truncated one.
BUFFER_SLACK_BYTES = 64 * 1024
# A method's largest request body unless its policy says otherwise.
DEFAULT_MAX_BODY_BYTES = MiB
# What Envoy reads ahead on one client connection before it stops reading (Envoy's edge
# advice); routes that buffer a whole body raise their own limit.
CONNECTION_BUFFER_BYTES = 32 * 1024


@dataclasses.dataclass(frozen=True)
class Policy:
    cluster: str
    # public: no credential; key: API key only; any: key or dashboard session;
    # session: a dashboard session only (people manage keys and money; programs, with
    # keys, spend); optional: a key if one is given (so keyed calls are counted).
    auth: str
    ledger: bool = False
    # The account's email must be verified (403 email_not_verified): calls that spend
    # credit or put a card on the account.
    verified: bool = False
    # A limit of ratelimit_svc/limits.py that session calls to this method also count
    # against, beyond the account's limit on every session call.
    session_limit: str = ""
    # Long-running (streams, generation): no route timeout, the router bounds it.
    long: bool = False
    # Largest request body; larger is a 413 before any service sees it.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Uploads: ledger_svc reads only the first LEDGER_PARTIAL_BYTES (enough for
    # a media header) instead of the whole body.
    ledger_partial_body: bool = False


# Public services and the policy of their methods; METHODS overrides one method.
SERVICES = {
    "tokens.auth.v1.Accounts": Policy("auth", "any"),
    "tokens.router.v1.Inference": Policy("router", "key", ledger=True, long=True, verified=True),
    "tokens.ledger.v1.Usage": Policy("ledger", "any"),
    "tokens.ledger.v1.Billing": Policy("ledger", "session"),
    "tokens.ratelimit.v1.RateLimits": Policy("ratelimit", "any"),
}
_CARD_SETUP = Policy("ledger", "session", verified=True, session_limit="card_setups_per_account")
METHODS = {
    "tokens.auth.v1.Accounts.CreateAccount": Policy("auth", "public"),
    "tokens.auth.v1.Accounts.CreateSession": Policy("auth", "public"),
    # The token in the mailed link is the credential.
    "tokens.auth.v1.Accounts.VerifyEmail": Policy("auth", "public"),
    "tokens.auth.v1.Accounts.CreateKey": Policy("auth", "session"),
    "tokens.auth.v1.Accounts.RevokeKey": Policy("auth", "session"),
    "tokens.auth.v1.Accounts.CreateUpgradeRequest": Policy("auth", "session"),
    "tokens.ledger.v1.Billing.GetBillingConfig": Policy("ledger", "any"),
    "tokens.ledger.v1.Billing.CreateSetupIntent": _CARD_SETUP,
    "tokens.ledger.v1.Billing.AttachPaymentMethod": _CARD_SETUP,
    "tokens.ledger.v1.Billing.CreateTopup": Policy("ledger", "session", verified=True),
    "tokens.router.v1.Inference.ListModels": Policy("router", "any"),
    "tokens.router.v1.Inference.GetModel": Policy("router", "any"),
    # Stripe's events carry no key: their signature (checked by ledger_svc) is the credential.
    "tokens.ledger.v1.Billing.HandleStripeWebhook": Policy("ledger", "public", max_body_bytes=256 * 1024),
    # Media. Audio uploads up to 25 MB (plus the form), of which ledger_svc reads the first
    # 64 KiB; reading a job or its content, or an image URL (no key needed, like OpenAI's
    # signed URLs), is never held or charged.
    "tokens.router.v1.Inference.CreateTranscription": Policy("router", "key", ledger=True, long=True,
                                                              verified=True, max_body_bytes=25_000_000 + MiB,
                                                              ledger_partial_body=True),
    "tokens.router.v1.Inference.GetImageFile": Policy("router", "optional"),
    "tokens.router.v1.Inference.GetVideo": Policy("router", "key"),
    "tokens.router.v1.Inference.GetVideoContent": Policy("router", "key", long=True),
}
PROTO_MODULES = ("tokens.auth.v1.auth_pb2", "tokens.router.v1.router_pb2", "tokens.ledger.v1.ledger_pb2",
                 "tokens.ratelimit.v1.ratelimit_pb2")
# Envoy's own replies (bad JSON, unknown path, too large, no healthy upstream)
# in OpenAI's shape. What they quote of the request is cut at
# common.errors.ECHO_CHARS_MAX characters: the path here, the transcoder's message
# about a body (%LOCAL_REPLY_BODY%, which takes no length) by envoy/errors.lua.
_ECHO = errors.ECHO_CHARS_MAX
_DETAIL = " (%RESPONSE_CODE_DETAILS%): %LOCAL_REPLY_BODY%"
_REQUEST = f"%REQ(:METHOD):16% %REQ(:PATH):{_ECHO}%"
LOCAL_REPLIES = (
    (400, "invalid_request_error", None, "Invalid request" + _DETAIL),
    (401, "invalid_request_error", "invalid_api_key", "Unauthorized" + _DETAIL),
    (403, "invalid_request_error", "forbidden", "Forbidden" + _DETAIL),
    (404, "invalid_request_error", "unknown_url", f"Invalid URL ({_REQUEST})"),
    (405, "invalid_request_error", "method_not_allowed", f"Method not allowed ({_REQUEST})"),
    (408, "invalid_request_error", "request_timeout", "The request took too long to arrive"),
    (413, "invalid_request_error", "request_too_large", "The request body is too large"),
    # envoy/errors.lua answers HTTP/1.0 with this (Envoy itself would send a bare text 426).
    (426, "invalid_request_error", "http_version_not_supported",
     "HTTP/1.0 is not supported: use HTTP/1.1 or HTTP/2"),
    (429, "requests", "rate_limit_exceeded", "Too many requests" + _DETAIL),
    (431, "invalid_request_error", "headers_too_large", "The request headers are too large"),
    (500, "server_error", "internal_error", "Internal error" + _DETAIL),
    (502, "server_error", "bad_gateway", "Bad gateway" + _DETAIL),
    (503, "server_error", "service_unavailable", "A service this call needs is unavailable; try again shortly "
                                                 "(%RESPONSE_CODE_DETAILS%)"),
    (504, "server_error", "timeout", "The call took too long" + _DETAIL),
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where everything listens. `clusters` maps a service to its replicas."""
    clusters: dict[str, list[tuple[str, int]]]
    # The mesh's certificates (common.tls): Envoy presents envoy.pem to every service and
    # trusts only services whose certificate the mesh's CA signed. Loaded by file name, so
    # no secret is in this config or in the admin's /config_dump.
    tls_dir: str
    listen_host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    descriptor: str = str(DESCRIPTOR)
    lua: str = str(LUA)
    access_log: str = "/dev/stdout"
    health_interval_s: float = 1.0
    # DNS names (docker-compose) instead of IP addresses.
    dns: bool = False
    # An unauthenticated listener straight to a backend, only for benchmarks.
    baseline: tuple[int, str, int] | None = None
    # Filters left out (benchmarks measure what one hop adds): "authz_ratelimit", "authz_ledger".
    without: frozenset[str] = frozenset()
    # Files served by Envoy itself (the dashboard): (path, or prefix ending in "/*", file, content type).
    static_files: tuple[tuple[str, str, str], ...] = ()
    # A request (headers and body) not received whole within this is a 408: a client that
    # trickles its body cannot hold a connection and a buffer open for long.
    request_timeout_s: float = 30.0
    # Envoy's heap; the overload manager sheds load as it fills (see _overload_manager).
    max_heap_bytes: int = 1024 * MiB
    # Open client connections, all clients together: Envoy 1.40 cannot cap them per client
    # address (no such filter; envoyproxy/envoy#27853 was closed unbuilt).
    max_connections: int = 10_000
    # The client-address rule, the one place it is set (see XFF_TRUSTED_HOPS).
    xff_trusted_hops: int = 0


@dataclasses.dataclass(frozen=True)
class Method:
    service: str
    name: str
    bindings: tuple[tuple[str, str], ...]  # (HTTP verb, path template)
    server_streaming: bool

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def policy(self) -> Policy:
        return METHODS.get(f"{self.service}.{self.name}", SERVICES[self.service])


def public_methods() -> list[Method]:
    methods = []
    for module_name in PROTO_MODULES:
        module = importlib.import_module(module_name)
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name not in SERVICES:
                continue
            for method in service.methods:
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                bindings = [_binding(rule)] + [_binding(extra) for extra in rule.additional_bindings]
                methods.append(Method(service.full_name, method.name,
                                      tuple(b for b in bindings if b), method.server_streaming))
    return methods


def _binding(rule) -> tuple[str, str] | None:
    for verb in ("get", "post", "put", "delete", "patch"):
        path = getattr(rule, verb)
        if path:
            return verb.upper(), path
    return None


def _template_regex(template: str) -> str:
    return "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"


def _authz_per_route(policy: Policy, without: frozenset[str] = frozenset()) -> dict:
    auth = {"auth": policy.auth, **({"verified": "required"} if policy.verified else {})}
    ratelimit = _enabled_authz()
    if policy.session_limit:
        ratelimit["check_settings"] = {"context_extensions": {"limit": policy.session_limit}}
    config = {
        "authz_auth": {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                       "check_settings": {"context_extensions": auth}},
        "authz_ratelimit": _disabled_authz() if policy.auth == "public" else ratelimit,
        "authz_ledger": _ledger_per_route(policy) if policy.ledger else _disabled_authz(),
    }
    return {name: value for name, value in config.items() if name not in without}


def _ledger_per_route(policy: Policy) -> dict:
    if not policy.ledger_partial_body:
        return _enabled_authz()
    return {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {"with_request_body": {"max_request_bytes": LEDGER_PARTIAL_BYTES,
                                                     "allow_partial_message": True, "pack_as_bytes": True}}}


def _enabled_authz() -> dict:
    return {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {}}


def _disabled_authz() -> dict:
    return {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "disabled": True}


def _route_action(policy: Policy) -> dict:
    action = {"cluster": policy.cluster, "timeout": "0s" if policy.long else "30s",
              # A replica that refuses the connection never saw the call: try another
              # (the call keeps its hold). Nothing that reached a service is retried.
              "retry_policy": {"retry_on": "connect-failure,refused-stream", "num_retries": 2,
                               "retry_host_predicate": [{
                                   "name": "envoy.retry_host_predicates.previous_hosts",
                                   "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                                             "previous_hosts.v3.PreviousHostsPredicate"}}],
                               "host_selection_retry_max_attempts": 3}}
    if policy.long:
        action["idle_timeout"] = "300s"
    return action


def _static_routes(topology: Topology) -> list[dict]:
    routes = []
    disabled = {"authz_auth": _disabled_authz(), "authz_ratelimit": _disabled_authz(),
                "authz_ledger": _disabled_authz(),
                "envoy.filters.http.grpc_json_transcoder": {
                    "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
    for path, filename, content_type in topology.static_files:
        match = {"prefix": path[:-1]} if path.endswith("/*") else {"path": path}
        routes.append({
            "name": f"static:{path}",
            "match": match,
            "direct_response": {"status": 200, "body": {"filename": filename}},
            "response_headers_to_add": [
                {"header": {"key": "content-type", "value": content_type}},
                {"header": {"key": "cache-control", "value": "no-cache"}},
                {"header": {"key": "x-content-type-options", "value": "nosniff"}},
                {"header": {"key": "content-security-policy", "value": CSP}}],
            "typed_per_filter_config": {k: v for k, v in disabled.items() if k not in topology.without},
        })
    return routes


# The dashboard loads only its own files (and Stripe.js, served by Stripe or localstripe).
CSP = ("default-src 'self'; script-src 'self' https://js.stripe.com http://127.0.0.1:* http://localhost:*; "
       "frame-src https://js.stripe.com http://127.0.0.1:* http://localhost:*; "
       "connect-src 'self' http://127.0.0.1:* http://localhost:* https://api.stripe.com; "
       "img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'")


def _routes(topology: Topology) -> list[dict]:
    routes = _static_routes(topology)
    for method in public_methods():
        policy = method.policy
        per_route = _authz_per_route(policy, topology.without)
        for verb, template in method.bindings:
            routes.append({
                "name": f"{method.name}:{verb} {template}",
                "match": {"safe_regex": {"regex": _template_regex(template)},
                          "headers": [{"name": ":method", "string_match": {"exact": verb}}]},
                "route": _route_action(policy),
                "request_body_buffer_limit": policy.max_body_bytes + BUFFER_SLACK_BYTES,
                "typed_per_filter_config": per_route,
            })
        routes.append({
            "name": method.grpc_path,
            "match": {"path": method.grpc_path},
            "route": _route_action(policy),
            "request_body_buffer_limit": policy.max_body_bytes + BUFFER_SLACK_BYTES,
            "typed_per_filter_config": per_route,
        })
    routes.append({
        "name": "not-found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": json.dumps(
            {"error": {"message": "Invalid URL", "type": "invalid_request_error", "param": None,
                       "code": "unknown_url"}})}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        "typed_per_filter_config": _authz_per_route(Policy("router", "optional"), topology.without),
    })
    return routes


def max_body_bytes() -> int:
    """The largest body any route takes (the transcoder's own limit)."""
    return max([DEFAULT_MAX_BODY_BYTES] + [p.max_body_bytes for p in [*SERVICES.values(), *METHODS.values()]])


def _local_reply_config() -> dict:
    mappers = [
        # ext_authz could not reach its service: 503 in our shape, not an empty 403.
        {"filter": {"and_filter": {"filters": [
            {"response_flag_filter": {"flags": ["UAEX"]}},
            {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": 503,
                                                                       "runtime_key": "unused.uaex503"}}}}]}},
         "body_format_override": _openai_body("server_error", "service_unavailable",
                                              "A service this call needs is unavailable; try again shortly.")},
        # Denials written by our ext_authz services are already exactly right.
        {"filter": {"response_flag_filter": {"flags": ["UAEX"]}},
         "body_format_override": {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                                  "content_type": "application/json"}},
    ]
    for status, kind, code, message in LOCAL_REPLIES:
        mappers.append({
            "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {
                "default_value": status, "runtime_key": f"unused.status{status}"}}}},
            "body_format_override": _openai_body(kind, code, message),
        })
    return {"mappers": mappers}


def _openai_body(kind: str, code: str | None, message: str) -> dict:
    return {"json_format": {"error": {"message": message, "type": kind, "param": None, "code": code}},
            "content_type": "application/json"}


def _ext_authz(cluster: str, topology: Topology, headers: list[dict], body: bool) -> dict:
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "3s"},
        "failure_mode_allow": False,
        "status_on_error": {"code": "ServiceUnavailable"},
        "allowed_headers": {"patterns": headers},
        "stat_prefix": cluster,
    }
    if body:
        config["with_request_body"] = {"max_request_bytes": DEFAULT_MAX_BODY_BYTES,
                                       "allow_partial_message": False, "pack_as_bytes": True}
    return config


def _http_filters(topology: Topology) -> list[dict]:
    exact = lambda name: {"exact": name}  # noqa: E731
    filters = [
        {"name": "envoy.filters.http.lua", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"filename": topology.lua}}},
        {"name": "authz_auth", "typed_config": _ext_authz(
            "auth", topology, [exact("authorization"), exact("cookie"), {"prefix": "x-ts-"},
                               exact("content-type"), exact("x-request-id")], body=False)},
        {"name": "authz_ratelimit", "typed_config": _ext_authz(
            "ratelimit", topology, [{"prefix": "x-ts-"}, exact("content-type"), exact("x-request-id")],
            body=False)},
        {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": topology.descriptor,
            "services": list(SERVICES),
            "convert_grpc_status": True,
            "print_options": {"preserve_proto_field_names": True, "always_print_primitive_fields": True},
            "request_validation_options": {"reject_unknown_method": True},
            "ignore_unknown_query_parameters": True,
            "max_request_body_size": max_body_bytes(),
        }},
        # grpc-encoding: a native caller's compressed message (ledger_svc's check.unframe inflates it).
        {"name": "authz_ledger", "typed_config": _ext_authz(
            "ledger", topology, [{"prefix": "x-ts-"}, exact("content-type"), exact("x-request-id"),
                                 exact("x-envoy-original-path"), exact("grpc-encoding")], body=True)},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]
    return [f for f in filters if f["name"] not in topology.without]


def _access_log(path: str) -> list[dict]:
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": path,
        "log_format": {"json_format": {
            "ts": "%START_TIME%", "svc": "envoy", "request_id": "%REQ(X-REQUEST-ID)%",
            "method": "%REQ(:METHOD)%", "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
            "status": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%", "details": "%RESPONSE_CODE_DETAILS%",
            "grpc_status": "%GRPC_STATUS%", "duration_ms": "%DURATION%", "bytes_in": "%BYTES_RECEIVED%",
            "bytes_out": "%BYTES_SENT%", "upstream": "%UPSTREAM_HOST%",
            # Where the time went, in microseconds: the request read, the filters before the
            # route (ext_authz hops, transcoder), the upstream's first byte, the whole exchange.
            "read_us": "%COMMON_DURATION(DS_RX_BEG:DS_RX_END:us)%",
            "filters_us": "%COMMON_DURATION(DS_RX_END:US_TX_BEG:us)%",
            "upstream_us": "%COMMON_DURATION(US_TX_BEG:US_RX_BEG:us)%",
            "total_us": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%"}}}}]


def _listener(topology: Topology) -> dict:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "public",
        "codec_type": "AUTO",
        # The client address (what signups and failed logins are counted by) is the
        # connection's peer, or with xff_trusted_hops N the Nth address from the right of
        # x-forwarded-for (the one the nearest trusted proxy saw). Envoy sets it as
        # x-envoy-external-address on every call and removes any copy a client sends.
        "use_remote_address": True,
        "xff_num_trusted_hops": topology.xff_trusted_hops,
        # Every client is external: a request id a client sends is replaced, so
        # ids stay unique (they key usage rows and exports).
        # An empty list means "the defaults" (loopback included); this range
        # matches no client.
        "internal_address_config": {"cidr_ranges": [{"address_prefix": "255.255.255.255", "prefix_len": 32}]},
        "preserve_external_request_id": False,
        "generate_request_id": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "stream_idle_timeout": "300s",
        "request_headers_timeout": "10s",
        "request_timeout": f"{topology.request_timeout_s:g}s",
        "common_http_protocol_options": {"idle_timeout": "300s", "headers_with_underscores_action": "REJECT_REQUEST",
                                         "max_headers_count": 100},
        # Taken in so that envoy/errors.lua can refuse it in OpenAI's shape.
        "http_protocol_options": {"accept_http_10": True},
        # Envoy's edge defaults (its "edge proxy" best practices): a client's streams and
        # flow-control windows bound what it can make Envoy buffer.
        "http2_protocol_options": {"max_concurrent_streams": 100, "initial_stream_window_size": 64 * 1024,
                                   "initial_connection_window_size": MiB},
        "max_request_headers_kb": 64,
        "access_log": _access_log(topology.access_log),
        "local_reply_config": _local_reply_config(),
        "route_config": {
            "name": "public",
            "max_direct_response_body_size_bytes": 4 * MiB,
            "virtual_hosts": [{
                "name": "api",
                "domains": ["*"],
                "routes": _routes(topology),
                "response_headers_to_add": [{"header": {"key": "x-request-id", "value": "%REQ(X-REQUEST-ID)%"},
                                             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                "response_headers_to_remove": ["grpc-accept-encoding", "x-envoy-upstream-service-time"],
            }],
        },
        "http_filters": _http_filters(topology),
    }
    return {
        "name": "public",
        "address": {"socket_address": {"address": topology.listen_host, "port_value": topology.port}},
        # Reads stop (TCP backs up) past this per connection; a route that must see a whole
        # body buffers up to its own request_body_buffer_limit instead.
        "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _cluster(name: str, endpoints: list[tuple[str, int]], topology: Topology) -> dict:
    return {
        "name": name,
        "type": "STRICT_DNS" if topology.dns else "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1024}}}},
        "circuit_breakers": {"thresholds": [{"max_connections": 10000, "max_pending_requests": 10000,
                                             "max_requests": 10000, "max_retries": 3}]},
        # update_merge_window 0: a replica whose health changed gets (or stops getting) calls at
        # once; by default workers learn it up to 1 s after the admin page (and wait_healthy) does.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}, "update_merge_window": "0s"},
        "health_checks": [{
            "timeout": "1s",
            "interval": f"{topology.health_interval_s}s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "no_traffic_interval": f"{topology.health_interval_s}s",
            "grpc_health_check": {"service_name": ""},
        }],
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
            for host, port in endpoints]}]},
        "transport_socket": _upstream_tls(topology.tls_dir),
    }


def _upstream_tls(tls_dir: str) -> dict:
    """Mutual TLS to a service: Envoy's certificate by file, the service's checked against
    the mesh's CA and the name every service certificate carries."""
    files = tls.Files.in_dir(tls_dir, "envoy")
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": tls.SERVER_NAME,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": str(files.cert)},
                                  "private_key": {"filename": str(files.key)}}],
            "validation_context": {
                "trusted_ca": {"filename": str(files.ca)},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": tls.SERVER_NAME}}]}}}}


def _baseline(topology: Topology) -> tuple[dict, dict]:
    port, host, backend_port = topology.baseline
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "baseline", "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "baseline", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "baseline_backend", "timeout": "0s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    listener = {"name": "baseline", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}
    cluster = {"name": "baseline_backend", "type": "STATIC", "connect_timeout": "1s",
               "circuit_breakers": {"thresholds": [{"max_connections": 10000, "max_pending_requests": 10000,
                                                    "max_requests": 10000}]},
               "load_assignment": {"cluster_name": "baseline_backend", "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {"address": host, "port_value": backend_port}}}}]}]}}
    return listener, cluster


def render(topology: Topology) -> dict:
    listeners = [_listener(topology)]
    clusters = [_cluster(name, topology.clusters[name], topology) for name in CLUSTERS]
    if topology.baseline:
        listener, cluster = _baseline(topology)
        listeners.append(listener)
        clusters.append(cluster)
    return {
        "admin": {"address": {"socket_address": {"address": topology.admin_host,
                                                 "port_value": topology.admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": _overload_manager(topology),
    }


HEAP = "envoy.resource_monitors.fixed_heap"


def _overload_manager(topology: Topology) -> dict:
    """Shed load before Envoy's memory runs out: as the heap fills, idle timeouts shrink and the
    streams holding the most buffered bytes are reset; near the top new requests get a 503
    (details "overload", in the 503 mapper's shape), keep-alive stops, and then new connections are closed."""
    def at(value: float) -> list[dict]:
        return [{"name": HEAP, "threshold": {"value": value}}]

    def scaled(low: float, high: float) -> list[dict]:
        return [{"name": HEAP, "scaled": {"scaling_threshold": low, "saturation_threshold": high}}]

    return {
        "refresh_interval": "0.25s",
        # Track buffer use per stream from 1 MiB, for reset_high_memory_stream.
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},
        "resource_monitors": [
            {"name": HEAP, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": topology.max_heap_bytes}},
            {"name": "envoy.resource_monitors.global_downstream_max_connections", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                         "DownstreamConnectionsConfig",
                "max_active_downstream_connections": topology.max_connections}},
        ],
        "actions": [
            {"name": "envoy.overload_actions.shrink_heap", "triggers": at(0.90)},
            {"name": "envoy.overload_actions.reduce_timeouts", "triggers": scaled(0.80, 0.95),
             "typed_config": {
                 "@type": "type.googleapis.com/envoy.config.overload.v3.ScaleTimersOverloadActionConfig",
                 "timer_scale_factors": [
                     {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": "5s"},
                     {"timer": "HTTP_DOWNSTREAM_STREAM_IDLE", "min_timeout": "30s"}]}},
            {"name": "envoy.overload_actions.reset_high_memory_stream", "triggers": scaled(0.90, 0.98)},
            {"name": "envoy.overload_actions.stop_accepting_requests", "triggers": at(0.95)},
            {"name": "envoy.overload_actions.disable_http_keepalive", "triggers": at(0.95)},
            # Closed at once (counted as downstream_cx_overload_reject), not left waiting in the backlog.
            {"name": "envoy.overload_actions.reject_incoming_connections", "triggers": at(0.98)},
        ],
    }


def write(topology: Topology, path: pathlib.Path) -> pathlib.Path:
    """The config as YAML at `path`, mode 0600 (it names the key files and the mesh's layout)."""
    import yaml

    from devtool import files

    files.write(path, "# Generated by devtool/envoy_config.py; do not edit.\n"
                + yaml.safe_dump(render(topology), sort_keys=False, width=120))
    return path
