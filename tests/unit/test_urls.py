"""The URL rule (common/urls.py): what the gateway relays or fetches, tried the way an attacker would."""
import base64
import socket

import pytest

from common import urls
from tests.dns import FakeDns

FORBIDDEN = [
    # loopback, every spelling of it
    ("http://127.0.0.1/", "loopback"), ("http://127.255.255.254:8080/x", "loopback"), ("http://[::1]/", "loopback"),
    ("http://2130706433/", "loopback"), ("http://0x7f000001/", "loopback"), ("http://0x7f.1/", "loopback"),
    ("http://0177.0.0.1/", "loopback"), ("http://017700000001/", "loopback"), ("http://127.1/", "loopback"),
    ("http://127.0.0.1./", "loopback"), ("http://%31%32%37.0.0.1/", "loopback"),
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "loopback"),  # fullwidth digits, mapped by IDNA
    ("http://127\u30020\u30020\u30021/", "loopback"),  # ideographic full stops
    ("http://[::ffff:127.0.0.1]/", "loopback"), ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[::127.0.0.1]/", "loopback"), ("http://[0:0:0:0:0:ffff:127.0.0.1]/", "loopback"),
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
    # link-local, the cloud metadata address first
    ("http://169.254.169.254/latest/meta-data/", "link-local"), ("http://2852039166/", "link-local"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "link-local"), ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    # private, shared
    ("http://10.0.0.1/", "private"), ("http://10.255.255.255/", "private"), ("http://172.16.0.1/", "private"),
    ("http://172.31.255.255/", "private"), ("http://192.168.0.1/", "private"), ("http://[::ffff:10.1.2.3]/", "private"),
    ("http://[64:ff9b::a00:1]/", "private"), ("http://100.64.0.1/", "shared (CGNAT)"),
    ("http://100.127.255.254/", "shared (CGNAT)"), ("http://[fc00::1]/", "private (unique local)"),
    ("http://[fd12:3456::1]/", "private (unique local)"),
    # multicast, unspecified, reserved
    ("http://224.0.0.1/", "multicast"), ("http://239.255.255.250/", "multicast"), ("http://[ff02::1]/", "multicast"),
    ("http://0.0.0.0/", "unspecified"), ("http://0/", "unspecified"), ("http://[::]/", "unspecified"),
    ("http://255.255.255.255/", "reserved"), ("http://240.0.0.1/", "reserved"), ("http://192.0.0.8/", "reserved"),
    ("http://198.18.0.1/", "benchmarking"), ("http://192.0.2.1/", "documentation"),
    ("http://[2001:db8::1]/", "documentation"), ("http://[2001::1]/", "reserved"),  # Teredo
    ("http://[::2]/", "unspecified"), ("http://[100::1]/", "reserved"),
]


@pytest.mark.parametrize("url,kind", FORBIDDEN)
def test_every_kind_of_non_public_address_is_refused_however_it_is_written(url, kind):
    with pytest.raises(urls.Refused) as caught:
        urls.parse(url)
    assert f" {kind} address" in str(caught.value), str(caught.value)


@pytest.mark.parametrize("url,canonical", [
    ("https://8.8.8.8/cat.png", "https://8.8.8.8/cat.png"),
    ("http://134744072/x", "http://8.8.8.8/x"), ("http://0x08.0x08.0x08.0x08/", "http://8.8.8.8/"),
    ("https://[2606:4700:4700::1111]:8443/a?b=1#c", "https://[2606:4700:4700::1111]:8443/a?b=1#c"),
    ("http://[::ffff:8.8.8.8]/", "http://[::ffff:808:808]/"),
    ("HTTPS://Example.COM./Path", "https://example.com/Path"),
    ("https://b\u00fccher.de/\u00e4?q=\u00fc", "https://xn--bcher-kva.de/%C3%A4?q=%C3%BC"),
    ("https://cdn.example.com", "https://cdn.example.com/"),
])
def test_public_addresses_and_names_pass_rebuilt_from_what_was_checked(url, canonical):
    target = urls.parse(url)
    assert target.url == canonical
    assert urls.parse(target.url) == target  # the rebuilt URL reads the same


@pytest.mark.parametrize("url,why", [
    ("file:///etc/passwd", "only https://"), ("gopher://example.com:70/_", "only https://"),
    ("ftp://example.com/x", "only https://"), ("javascript:alert(1)", "only https://"),
    ("ws://example.com/", "only https://"), ("//example.com/x", "only https://"), ("example.com/x", "only https://"),
    ("http:/example.com/", "must start with http://"), ("http:example.com", "must start with http://"),
    ("http://public@127.0.0.1/", "credentials"), ("http://8.8.8.8@127.0.0.1/", "credentials"),
    ("http://user:pass@example.com/", "credentials"), ("http://%40@example.com/", "credentials"),
    ("http://8.8.8.8\\@127.0.0.1/", "backslash"), ("http://example.com\\.127.0.0.1/", "backslash"),
    ("http://exa mple.com/", "whitespace"), ("http://example.com/\nHost: x", "whitespace"),
    ("http://example.com\t/", "whitespace"), ("http://example.com/\x00", "control"),
    ("http://localhost/", "special-use"), ("http://LOCALHOST./", "special-use"),
    ("http://a.b.localhost/", "special-use"),
    ("http://printer.local/", "special-use"), ("http://metadata.google.internal/", "special-use"),
    ("http://router.home.arpa/", "special-use"), ("http://intranet/", "fully qualified"),
    ("http://1.2.3.4.5/", "IPv4"), ("http://256.0.0.1/", "IPv4"), ("http://1.2.3.09/", "IPv4"),
    ("http://1..2/", "IPv4"), ("http://0x1.0x100.0.0/", "IPv4"), ("http://4294967296/", "IPv4"),
    ("http://[fe80::1%25eth0]/", "zone"), ("http://[::1/", "cannot be read"),
    ("http://[127.0.0.1]/", "cannot be in brackets"),
    ("http://example.com:0/", "port 0"), ("http://example.com:70000/", "cannot be read"),
    ("http://exa_mple..com/", "valid name"), ("http://ex%zzample.com/", "valid name"), ("http:///x", "no host"),
    ("http://" + "a" * 64 + ".com/", "valid name"), ("http://example.com/" + "a" * 9000, "longer than"),
    ("", "empty"),
])
def test_schemes_tricks_and_malformed_urls_are_refused_with_a_reason(url, why):
    with pytest.raises(urls.Refused) as caught:
        urls.parse(url)
    assert why in str(caught.value), str(caught.value)


async def test_a_name_is_judged_by_every_address_it_resolves_to():
    dns = FakeDns({"cdn.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
                   "rebind.example.com": ["93.184.215.14", "127.0.0.1"],
                   "meta.example.com": ["169.254.169.254"], "v6.example.com": ["::1"],
                   "mapped.example.com": ["::ffff:10.0.0.1"], "many.example.com": [f"8.8.{i}.1" for i in range(17)],
                   "empty.example.com": [], "junk.example.com": ["not-an-address"]})
    target, addresses = await urls.check("https://cdn.example.com/a.png", dns)
    assert target.url == "https://cdn.example.com/a.png"
    assert addresses == ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    assert dns.asked == [("cdn.example.com", 443)]
    for host, why in [("rebind", "loopback"), ("meta", "link-local"), ("v6", "loopback"), ("mapped", "private"),
                      ("many", "more than 16"), ("empty", "does not resolve"), ("nowhere", "does not resolve"),
                      ("junk", "not an address")]:
        with pytest.raises(urls.Refused) as caught:
            await urls.check(f"http://{host}.example.com:8080/x", dns)
        assert why in str(caught.value), (host, str(caught.value))
    assert dns.asked[-1] == ("junk.example.com", 8080)


async def test_a_literal_address_is_never_looked_up():
    dns = FakeDns({})
    assert (await urls.check("http://8.8.8.8/", dns))[1] == ("8.8.8.8",)
    assert dns.asked == []


async def test_a_lookup_that_hangs_is_refused_at_the_timeout():
    async def never(host, port):
        import asyncio
        await asyncio.Event().wait()
    with pytest.raises(urls.Refused) as caught:
        await urls.check("https://slow.example.com/", never, timeout_s=0.01)
    assert "could not be resolved within" in str(caught.value)


async def test_the_system_resolver_refuses_localhost_by_its_addresses():
    """The real getaddrinfo path: localhost resolves (from /etc/hosts) to loopback only."""
    target = urls.Target("http://localhost/", "http", "localhost", 80, None)
    with pytest.raises(urls.Refused) as caught:
        await urls.resolve_public(target)
    assert "loopback" in str(caught.value)


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(100)).decode()


def test_data_urls_need_base64_a_fitting_type_and_a_bounded_size():
    assert urls.data_url(f"data:image/png;base64,{PNG}", ("image/png", "image/jpeg")) == urls.Data("image/png", 108)
    assert urls.data_url(f"DATA:Image/PNG;BASE64,{PNG}", ("image/png",)).size_bytes == 108
    assert urls.data_url(f"data:text/csv;base64,{PNG}", ("application/pdf", "text/")).media_type == "text/csv"
    for url, why in [
        (f"data:image/svg+xml;base64,{PNG}", "must be of type image/png"),
        (f"data:application/pdf;base64,{PNG}", "must be of type"), (f"data:;base64,{PNG}", "not 'none'"),
        (f"data:text/;base64,{PNG}", "must be of type"),
        ("data:image/png,<svg/onload=alert(1)>", "must be base64"), ("data:image/png;base64", "must be base64"),
        ("data:image/png;base64,not base64!", "not valid base64"), ("data:image/png;base64,QUJD\nREVG", "not valid"),
        ("data:image/png;base64,QUJ", "not valid base64"),
        (f"data:image/png;base64,{base64.b64encode(bytes(1001)).decode()}", "larger than 1000 bytes"),
        ("https://8.8.8.8/x.png", "not a data: URL"),
    ]:
        with pytest.raises(urls.Refused) as caught:
            urls.data_url(url, ("image/png", "text/"), max_bytes=1000)
        assert why in str(caught.value), (url, str(caught.value))
    assert urls.data_url(f"data:image/png;base64,{base64.b64encode(bytes(1000)).decode()}", ("image/png",),
                         max_bytes=1000).size_bytes == 1000


def test_a_huge_data_url_is_refused_by_its_length_before_it_is_decoded():
    with pytest.raises(urls.Refused, match="larger than 10 bytes"):
        urls.base64_size("!" * 1_000_000, max_bytes=10)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700::1111", "2a00:1450::1",
                                     "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_have_no_problem(address):
    import ipaddress
    assert urls.address_problem(ipaddress.ip_address(address)) is None


async def test_the_pinned_resolver_answers_only_the_checked_addresses():
    pinned = urls.PinnedResolver({"cdn.example.com": ("93.184.215.14", "2606:4700::1111")})
    found = await pinned.resolve("cdn.example.com", 443)
    assert [(r["host"], r["port"], r["family"]) for r in found] == [
        ("93.184.215.14", 443, socket.AF_INET), ("2606:4700::1111", 443, socket.AF_INET6)]
    with pytest.raises(OSError):
        await pinned.resolve("other.example.com", 443)
