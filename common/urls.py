"""Which URLs the gateway relays to a backend or fetches itself: public http(s), or bounded data: URLs.

A URL a stranger gives (an image part of a chat call) or a backend returns (an image it
made) must not carry the gateway, or a backend behind it, into a private network. The
rule, in one place:

- http:// or https:// to a host whose every address is public: not loopback, link-local
  (169.254.169.254 included), private, shared (100.64/10), multicast, unspecified,
  documentation, benchmarking or otherwise reserved, in v4 and v6, IPv6 forms that embed
  an IPv4 address (mapped, compatible, NAT64, 6to4) judged by that address. Names are
  resolved (with a timeout and a bound on the addresses) and judged by what they resolve
  to; a name that does not resolve is refused.
- Hosts are read the way a browser (WHATWG URL) reads them, so that no other parser sees
  a different host: percent-decoding, IDNA (fullwidth digits and dots included), IPv4
  written in decimal, octal or hex or with fewer parts (http://2130706433/,
  http://0x7f.1/), a trailing dot. Credentials (user@host), backslashes, whitespace and
  control characters are refused outright, as parsers disagree on them.
- data: URLs: base64, a media type the part allows, and a bounded size.

Callers forward or fetch `Target.url`, the URL rebuilt from what was checked, never the
text they were given. A fetch connects to the addresses that were checked (`pinned`), so a
name that resolves differently a moment later (DNS rebinding) cannot redirect it.
"""
import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable

import aiohttp
import aiohttp.abc

SCHEMES = {"http": 80, "https": 443}
URL_CHARS_MAX = 8192
RESOLVE_TIMEOUT_S = 3.0
# A name with more addresses than this is refused rather than partly checked.
ADDRESSES_MAX = 16
# Lookups run on threads of their own (getaddrinfo blocks), so slow names cannot starve
# the event loop's default executor; at most this many run at once.
RESOLVER_THREADS = 8
DATA_BYTES_MAX = 20 * 1024 * 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the host's addresses as strings; raises OSError when it does not resolve.
Resolver = Callable[[str, int], Awaitable[list[str]]]

IPV4_FORBIDDEN = tuple((ipaddress.IPv4Network(net), kind) for net, kind in (
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"), ("192.0.2.0/24", "documentation"), ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"), ("198.18.0.0/15", "benchmarking"), ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"), ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"),
))
# Public IPv6 is global unicast (2000::/3) less these; everything outside 2000::/3 is refused.
IPV6_FORBIDDEN = tuple((ipaddress.IPv6Network(net), kind) for net, kind in (
    ("2001::/23", "reserved"), ("2001:db8::/32", "documentation"), ("3fff::/20", "documentation"),
))
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_OUTSIDE_KINDS = tuple((ipaddress.IPv6Network(net), kind) for net, kind in (
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("fe80::/10", "link-local"), ("fec0::/10", "site-local"),
    ("fc00::/7", "private (unique local)"), ("ff00::/8", "multicast"), ("64:ff9b:1::/48", "private (NAT64)"),
))
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
# Names that never denote a public host (RFC 6761, 6762, 8375, 9476; .internal and .lan by use).
SPECIAL_SUFFIXES = ("localhost", "local", "internal", "lan", "home.arpa", "invalid", "test", "onion", "alt")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DECIMAL, _HEX, _OCTAL = re.compile(r"[0-9]+"), re.compile(r"0[xX][0-9a-fA-F]*"), re.compile(r"0[0-7]*")
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


class Refused(ValueError):
    """The URL is not one the gateway relays or fetches; the message says why, to the caller."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A checked http(s) URL: `url` is rebuilt from the parts that were checked."""

    url: str
    scheme: str
    host: str  # lowercase ASCII: a name (IDNA applied) or an address's canonical text
    port: int
    address: Address | None  # the host, when it is an address rather than a name


@dataclasses.dataclass(frozen=True)
class Data:
    media_type: str
    size_bytes: int


def address_problem(address: Address) -> str | None:
    """Why an address is not public ("loopback", "private", ...), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "link-local"
        embedded = _embedded_v4(address)
        if embedded is not None:
            problem = address_problem(embedded)
            if problem is not None:
                return problem
            # An IPv4-compatible address (deprecated) is never a way to reach a public host.
            return "reserved" if address in _COMPATIBLE else None
        if address not in _GLOBAL_UNICAST:
            return next((kind for net, kind in _OUTSIDE_KINDS if address in net), "reserved")
        table = IPV6_FORBIDDEN
    else:
        table = IPV4_FORBIDDEN
    for net, kind in table:
        if address in net:
            return kind
    # Belt and braces beside the tables: anything ipaddress knows as not public.
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_private or address.is_reserved or not address.is_global:
        return "not globally reachable"
    return None


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in _MAPPED or address in _NAT64 or (address in _COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def parse(url: str) -> Target:
    """The http(s) URL checked as far as it can be without DNS: a literal address is judged
    here; a name must still pass `resolve_public`."""
    if not isinstance(url, str) or not url:
        raise Refused("the URL is empty")
    if len(url) > URL_CHARS_MAX:
        raise Refused(f"the URL is longer than {URL_CHARS_MAX} characters")
    if _UNSAFE.search(url):
        raise Refused("the URL contains whitespace, a control character or a backslash")
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in SCHEMES:
        raise Refused("only https://, http:// and data: URLs are accepted")
    if not rest.startswith("//"):
        raise Refused(f"a {scheme} URL must start with {scheme}://")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise Refused(f"the URL cannot be read: {error}") from None
    if "@" in parts.netloc:
        raise Refused("URLs with credentials (user@host) are not accepted")
    host, address = _host(parts.netloc)
    if port == 0:
        raise Refused("port 0 is not a port a URL can name")
    if address is not None:
        problem = address_problem(address)
        if problem is not None:
            raise Refused(f"the URL points at {_a(problem)} address, not a public one")
    else:
        _check_name(host)
    shown = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
    authority = shown if port is None else f"{shown}:{port}"
    path = urllib.parse.quote(parts.path, safe=_PATH_SAFE) or "/"
    query = "?" + urllib.parse.quote(parts.query, safe=_PATH_SAFE + "?") if parts.query else ""
    fragment = "#" + urllib.parse.quote(parts.fragment, safe=_PATH_SAFE + "?#") if parts.fragment else ""
    return Target(url=f"{scheme}://{authority}{path}{query}{fragment}", scheme=scheme, host=host,
                  port=port or SCHEMES[scheme], address=address)


def _host(netloc: str) -> tuple[str, Address | None]:
    """(canonical host, its address when it is one) of an authority without userinfo."""
    if netloc.startswith("["):
        inner, bracket, _port = netloc[1:].partition("]")
        try:
            if not bracket or "%" in inner:
                raise ValueError(inner)
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise Refused("the URL's host is not a valid IPv6 address (zone ids are not accepted)") from None
        return str(address), address
    raw = netloc.rpartition(":")[0] if ":" in netloc else netloc
    try:
        host = urllib.parse.unquote(raw, errors="strict")
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        raise Refused("the URL's host is not a valid name") from None
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise Refused("the URL has no host")
    number = _ipv4_number(host)
    if number is not None:
        address = ipaddress.IPv4Address(number)
        return str(address), address
    return host, None


def _ipv4_number(host: str) -> int | None:
    """WHATWG's IPv4 parser: the address a host written as numbers means, None for a name."""
    parts = host.split(".")
    last = parts[-1]
    if not (_DECIMAL.fullmatch(last) or _HEX.fullmatch(last)):
        return None
    if len(parts) > 4 or "" in parts:
        raise Refused("the URL's host is not a valid IPv4 address")
    numbers = [_ipv4_part(part) for part in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise Refused("the URL's host is not a valid IPv4 address")
    value = numbers[-1]
    for index, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - index))
    return value


def _ipv4_part(part: str) -> int:
    if _HEX.fullmatch(part):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if not _OCTAL.fullmatch(part):
            raise Refused("the URL's host is not a valid IPv4 address")
        return int(part, 8)
    if not _DECIMAL.fullmatch(part):
        raise Refused("the URL's host is not a valid IPv4 address")
    return int(part)


def _check_name(host: str) -> None:
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise Refused("the URL's host is not a valid name")
    if any(host == suffix or host.endswith("." + suffix) for suffix in SPECIAL_SUFFIXES):
        raise Refused(f"the URL's host {host!r} is a special-use name, not a public one")
    # A single label means whatever a resolver's search domains make of it, which need
    # not be the same for the gateway and a backend.
    if len(labels) < 2:
        raise Refused("the URL's host must be a fully qualified domain name")


_threads: concurrent.futures.ThreadPoolExecutor | None = None


async def resolve_system(host: str, port: int) -> list[str]:
    """The host's TCP addresses from the system's resolver (getaddrinfo, on a thread)."""
    global _threads
    if _threads is None:
        _threads = concurrent.futures.ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="resolve")
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(_threads, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    return [info[4][0] for info in found]


async def resolve_public(target: Target, resolve: Resolver = resolve_system,
                         timeout_s: float = RESOLVE_TIMEOUT_S) -> tuple[str, ...]:
    """The target's addresses, every one public; Refused when any is not, or none is found."""
    if target.address is not None:
        return (str(target.address),)
    try:
        async with asyncio.timeout(timeout_s):
            found = await resolve(target.host, target.port)
    except TimeoutError:
        raise Refused(f"the URL's host {target.host!r} could not be resolved within {timeout_s:g} s") from None
    except (OSError, UnicodeError):
        raise Refused(f"the URL's host {target.host!r} does not resolve") from None
    addresses = list(dict.fromkeys(found))
    if not addresses:
        raise Refused(f"the URL's host {target.host!r} does not resolve")
    if len(addresses) > ADDRESSES_MAX:
        raise Refused(f"the URL's host {target.host!r} has more than {ADDRESSES_MAX} addresses")
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise Refused(f"the URL's host {target.host!r} resolves to something that is not an address") from None
        problem = address_problem(address)
        if problem is not None:
            raise Refused(f"the URL's host {target.host!r} resolves to {_a(problem)} address, not a public one")
    return tuple(addresses)


async def check(url: str, resolve: Resolver = resolve_system,
                timeout_s: float = RESOLVE_TIMEOUT_S) -> tuple[Target, tuple[str, ...]]:
    """The whole rule for an http(s) URL: (what to fetch, the addresses it may connect to)."""
    target = parse(url)
    return target, await resolve_public(target, resolve, timeout_s)


def data_url(url: str, media_types: Iterable[str], max_bytes: int = DATA_BYTES_MAX) -> Data:
    """A base64 data: URL of one of `media_types` ("image/png", or "text/" for any text type),
    at most `max_bytes` once decoded."""
    if not url[:5].lower() == "data:":
        raise Refused("not a data: URL")
    header, comma, payload = url[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or len(params) < 2 or params[-1] != "base64":
        raise Refused("a data: URL must be base64 (data:<media type>;base64,<data>)")
    media_type, allowed = params[0], tuple(media_types)
    if not any(_fits(media_type, t) for t in allowed):
        names = ", ".join(t + "*" if t.endswith("/") else t for t in allowed)
        raise Refused(f"a data: URL here must be of type {names}, not {media_type or 'none'!r}")
    return Data(media_type, base64_size(payload, max_bytes))


def _fits(media_type: str, allowed: str) -> bool:
    if allowed.endswith("/"):
        return media_type.startswith(allowed) and len(media_type) > len(allowed)
    return media_type == allowed


def base64_size(payload: str, max_bytes: int = DATA_BYTES_MAX) -> int:
    """Decoded size of strict base64 text (no whitespace), refused beyond `max_bytes`."""
    if len(payload) // 4 * 3 > max_bytes + 2:  # padding: up to 2 bytes fewer than 3 per 4 characters
        raise Refused(f"the data is larger than {max_bytes} bytes")
    try:
        size = len(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise Refused("the data is not valid base64") from None
    if size > max_bytes:
        raise Refused(f"the data is larger than {max_bytes} bytes")
    return size


class PinnedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver for a fetch of checked targets: each host resolves to the addresses
    that were checked, and only those, so no second lookup can change where it connects."""

    def __init__(self, pins: dict[str, tuple[str, ...]]) -> None:
        self._pins = pins

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list:
        addresses = self._pins.get(host.lower().rstrip("."))
        if not addresses:
            raise OSError(f"{host} was not checked; it is not fetched")
        return [{"hostname": host, "host": a, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET} for a in addresses]

    async def close(self) -> None:
        return None


def pinned_session(pins: dict[str, tuple[str, ...]], **session_options) -> aiohttp.ClientSession:
    """A session that connects only to the checked addresses of the checked hosts, with no
    proxy from the environment and no DNS of its own."""
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(pins), use_dns_cache=False, limit=4)
    return aiohttp.ClientSession(connector=connector, trust_env=False, **session_options)
