"""Tests for citeqa.ingest.fetch: every SSRF rule, redirects, caps, and one real local server.

The network is ``httpx.MockTransport`` and DNS an injected resolver, except for one test that
fetches from a real ``http.server`` on 127.0.0.1 (never the internet).
"""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citeqa.api.errors import map_citeqa_error
from citeqa.errors import BadURLError, BlockedURLError, FetchError, UnreadablePageError
from citeqa.ingest import FetchedPage, Fetcher, FetchPolicy, check_ip

PUBLIC = "93.184.216.34"
PUBLIC6 = "2606:2800:220:1:248:1893:25c8:1946"
HTML = "<html><head><title>Example</title></head><body><p>Hello web</p></body></html>"

Handler = Callable[[httpx.Request], httpx.Response]


def html_response(text: str = HTML, **headers: str) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Type": "text/html; charset=utf-8", **headers},
                          text=text)  # fmt: skip


class Recorder:
    """A MockTransport handler that records requests and answers from a table by (host, path)."""

    def __init__(self, routes: dict[str, Callable[[], httpx.Response]] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.routes = routes or {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        key = f"{request.headers['Host']}{request.url.path}"
        if key in self.routes:
            return self.routes[key]()
        return html_response()


class Dns:
    """An injectable resolver from a table; counts lookups."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError(f"Name or service not known: {host}")
        return self.table[host]


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"resolver must not be called for {host!r}")


def fetcher(
    handler: Handler | None = None,
    dns: Callable[[str, int], list[str]] = no_dns,
    **policy: object,
) -> Fetcher:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no connection expected, got {request.url}")

    return Fetcher(
        FetchPolicy(**policy),  # type: ignore[arg-type]
        transport=httpx.MockTransport(handler or refuse),
        resolver=dns,
    )


# --------------------------------------------------------------------------- check_ip

ALWAYS_BLOCKED = [
    "169.254.169.254",  # cloud metadata
    "fd00:ec2::254",
    "169.254.170.23",  # EKS Pod Identity credentials (fetched with allow_private before)
    "169.254.0.23",  # Tencent Cloud metadata
    "fd00:ec2::23",
    "100.100.100.200",
    "::ffff:169.254.169.254",  # metadata, IPv4-mapped
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.0.192",  # Oracle Cloud Classic metadata (is_global says yes)
    "192.0.0.8",  # IETF protocol assignments
    "5f00::1",  # SRv6 segment identifiers (is_global says yes)
    "3fff::1",  # documentation (is_global says yes)
]
PRIVATE = [
    "127.0.0.1",
    "127.255.0.9",
    "::1",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "fc00::1",
    "fd12:3456::1",
    "169.254.1.1",
    "fe80::1",
    "fe80::1%eth0",
    "100.64.0.1",
    "100.127.255.254",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible
    "::ffff:0:10.0.0.1",  # IPv4-translated
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::",  # 6to4 of 192.168.1.1
    "64:ff9b::10.0.0.1",  # NAT64 of 10.0.0.1
    "192.0.2.10",  # documentation (not global)
]
PUBLIC_IPS = [PUBLIC, "8.8.8.8", "1.1.1.1", PUBLIC6, "2002:808:808::1", "64:ff9b::8.8.8.8",
              "192.0.0.9", "192.0.0.10"]  # global anycast inside 192.0.0.0/24


def test_a_6to4_address_is_judged_by_its_ipv4_whatever_pythons_table_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11.10, 3.12.4 and 3.13 call all of 2002::/16 private: a public host's 6to4
    address was refused there ("a private address"), allowed on older patch releases."""
    import ipaddress

    sixtofour = ipaddress.ip_network("2002::/16")
    private = ipaddress.IPv6Address.is_private.fget  # type: ignore[attr-defined]
    monkeypatch.setattr(ipaddress.IPv6Address, "is_private", property(
        lambda self: self in sixtofour or private(self)))
    check_ip("2002:808:808::1")  # 8.8.8.8 inside
    for ip in ("2002:7f00:1::1", "2002:c0a8:101::"):  # 127.0.0.1, 192.168.1.1 inside
        with pytest.raises(BlockedURLError):
            check_ip(ip)


@pytest.mark.parametrize("ip", ALWAYS_BLOCKED)
def test_check_ip_always_blocked(ip: str) -> None:
    with pytest.raises(BlockedURLError):
        check_ip(ip)
    with pytest.raises(BlockedURLError):
        check_ip(ip, allow_private=True)


@pytest.mark.parametrize("ip", PRIVATE)
def test_check_ip_private_needs_opt_in(ip: str) -> None:
    with pytest.raises(BlockedURLError, match="--allow-private-urls"):
        check_ip(ip)
    check_ip(ip, allow_private=True)


@pytest.mark.parametrize("ip", PUBLIC_IPS)
def test_check_ip_public_allowed(ip: str) -> None:
    check_ip(ip)
    check_ip(ip, allow_private=True)


def test_check_ip_rejects_non_addresses() -> None:
    with pytest.raises(BlockedURLError, match="not an IP address"):
        check_ip("example.com")


@settings(max_examples=200, deadline=None)
@given(
    net=st.sampled_from(["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                         "169.254.0.0/16", "100.64.0.0/10"]),  # fmt: skip
    offset=st.integers(min_value=0, max_value=2**24 - 1),
    form=st.sampled_from(["dotted", "int", "hex", "octal", "mapped", "short"]),
)
def test_private_ipv4_blocked_in_every_url_form(net: str, offset: int, form: str) -> None:
    network = ipaddress.ip_network(net)
    ip = network[offset % network.num_addresses]
    n = int(ip)
    a, b, c, d = ip.packed
    host = {
        "dotted": str(ip),
        "int": str(n),
        "hex": hex(n),
        "octal": "0" + oct(n)[2:],
        "mapped": f"[::ffff:{ip}]",
        "short": f"{a}.{(b << 16) | (c << 8) | d}",
    }[form]
    with pytest.raises(BlockedURLError):
        fetcher().fetch(f"http://{host}/")


# --------------------------------------------------------------------------- URL rules


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file.txt",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "http://user:secret@example.com/",
        "http://user@example.com/",
        "http://localhost/",
        "http://LOCALHOST./admin",
        "http://api.localhost:8080/",
        "http://127.0.0.1/",
        "http://127.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://0/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://[fe80::1%25eth0]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "not a url",
    ],
)
def test_blocked_urls_never_connect(url: str) -> None:
    with pytest.raises(BlockedURLError):
        fetcher().fetch(url)


def test_a_refused_urls_password_is_not_said_back() -> None:
    """The 400 body repeated "http://user:PASSWD@...: credentials in URLs are not allowed"."""
    for url in ("http://user:PASSWD@example.com/x", "http://user:PASSWD@127.0.0.1/"):
        with pytest.raises(BlockedURLError) as e:
            fetcher().fetch(url)
        assert "PASSWD" not in str(e.value) and "http://example.com/x" in str(e.value) or (
            "http://127.0.0.1/" in str(e.value)), str(e.value)
    rec = Recorder({"example.com/r": lambda: httpx.Response(  # a redirect to one
        302, headers={"Location": "http://u:PASSWD@example.com/in"})})
    with pytest.raises(BlockedURLError) as e:
        fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/r")
    assert "PASSWD" not in str(e.value) and "redirected to http://example.com/in" in str(e.value)


@pytest.mark.parametrize(
    "url",
    [
        "http:///no-host",
        "http://1.2.3.4.5/",
        "http://example.123/",
        "https://a..b/",
        "https://.example.com/",
        "https://exa%20mple.org/",
        "https://exa$mple.org/",
        "https://" + "x" * 64 + ".org/",
        "https://" + "x." * 127 + "org/",  # 257 characters
        "https://-/",
        "http://[::1/",
        "http://example.com:0/",
        "http://example.com:-1/",
        "http://93.184.216.34:65536/",  # the resolver wraps it: port 0
        "http://example.com:65616/",  # port 80, wrapped
        "http://93.184.216.34:99999999999999999999/",  # an OverflowError in the connect: 500
    ],
)
def test_malformed_urls_are_bad_urls_and_never_connect(url: str) -> None:
    """The caller's mistake (the API answers 422), found before any DNS lookup or connection."""
    with pytest.raises(BadURLError) as info:
        fetcher().fetch(url)
    assert not isinstance(info.value, BlockedURLError)


def test_a_private_address_says_how_to_opt_in() -> None:
    for url in ("http://127.0.0.1/", "http://localhost/"):
        with pytest.raises(BlockedURLError, match=r"opt in with --allow-private-urls \(`citeqa "
                           r"index build` or `index add`\), or CITEQA_ALLOW_PRIVATE_URLS=1 for "
                           "`citeqa serve`"):
            fetcher().fetch(url)
    with pytest.raises(BlockedURLError) as info:  # metadata: no opt-in can open it
        fetcher(allow_private=True).fetch("http://169.254.169.254/")
    assert "opt in" not in str(info.value)


@pytest.mark.parametrize("url", ["http://:80/", "  http://:80/x ", "https:///moths"])
def test_a_bad_url_is_named_as_the_user_wrote_it(url: str) -> None:
    """httpx prints ``http://:80/`` as ``http:/``: the message names what was sent."""
    with pytest.raises(BadURLError) as info:
        fetcher().fetch(url)
    assert str(info.value).startswith(f"{url.strip()}: "), info.value


def test_a_host_that_does_not_exist_is_a_bad_url() -> None:
    def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(BadURLError, match="'nowhere.example' does not exist"):
        fetcher(dns=nxdomain).fetch("http://nowhere.example/")
    with pytest.raises(BadURLError, match="no address"):
        fetcher(dns=lambda host, port: []).fetch("http://nowhere.example/")


def test_dns_that_fails_for_now_is_not_the_callers_mistake() -> None:
    def again(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(FetchError, match="could not resolve") as info:
        fetcher(dns=again).fetch("http://example.com/")
    assert not isinstance(info.value, BadURLError)


def test_ordinary_host_names_pass_the_syntax_check() -> None:
    names = ["example.com", "EXAMPLE.com.", "x_y.example.com", "r3---sn-abc.example.com",
             "xn--bcher-kva.example", "a" * 63 + ".org", "localhost.example"]
    dns = Dns({n.lower().rstrip("."): [PUBLIC] for n in names})
    rec = Recorder()
    for name in names:
        assert fetcher(rec, dns).fetch(f"https://{name}/").text == "Hello web"


def test_metadata_blocked_even_with_allow_private() -> None:
    with pytest.raises(BlockedURLError, match="metadata"):
        fetcher(allow_private=True).fetch("http://169.254.169.254/latest/meta-data/")
    dns = Dns({"metadata.google.internal": ["169.254.169.254"]})
    with pytest.raises(BlockedURLError, match="metadata"):
        fetcher(dns=dns, allow_private=True).fetch("http://metadata.google.internal/")


@pytest.mark.parametrize(
    "answer",
    [["10.0.0.7"], ["127.0.0.1"], ["::ffff:10.0.0.7"], ["169.254.169.254"], ["100.64.3.3"],
     ["fd00::5"], [PUBLIC, "10.0.0.7"], ["10.0.0.7", PUBLIC], [PUBLIC6, "::1"]],  # fmt: skip
)
def test_dns_answers_with_any_blocked_address_are_refused(answer: list[str]) -> None:
    dns = Dns({"evil.example": answer})
    with pytest.raises(BlockedURLError, match="evil.example resolves to") as refused:
        fetcher(dns=dns).fetch("https://evil.example/")
    assert dns.calls == ["evil.example"]
    blocked = next(a for a in answer if a not in (PUBLIC, PUBLIC6))
    # a server's caller must not learn what an internal name resolves to
    assert blocked not in str(refused.value) and "10.0.0.7" not in str(refused.value)


def test_unresolvable_host_is_a_fetch_error() -> None:
    with pytest.raises(FetchError, match="could not resolve") as info:
        fetcher(dns=Dns({})).fetch("http://nowhere.invalid/")
    assert not isinstance(info.value, BlockedURLError)


def test_public_http_connects_to_checked_ip_with_host_header() -> None:
    rec = Recorder()
    dns = Dns({"example.com": [PUBLIC]})
    page = fetcher(rec, dns).fetch("http://Example.com:8080/a/b?q=1")
    assert page == FetchedPage(
        url="http://Example.com:8080/a/b?q=1",
        final_url="http://example.com:8080/a/b?q=1",
        content_type="text/html",
        text="Hello web",
        title="Example",
    )
    (req,) = rec.requests
    assert req.url.host == PUBLIC and req.url.port == 8080 and req.url.path == "/a/b"
    assert req.headers["Host"] == "example.com:8080"
    assert "sni_hostname" not in req.extensions
    assert dns.calls == ["example.com"]


def test_https_sends_original_name_as_sni() -> None:
    rec = Recorder()
    fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("https://example.com/")
    (req,) = rec.requests
    assert req.url.scheme == "https" and req.url.host == PUBLIC
    assert req.headers["Host"] == "example.com"
    assert req.extensions["sni_hostname"] == "example.com"


def test_ipv6_literal_public_is_fetched() -> None:
    rec = Recorder()
    page = fetcher(rec).fetch(f"http://[{PUBLIC6}]/")
    assert page.text == "Hello web"
    assert rec.requests[0].url.host == PUBLIC6
    assert rec.requests[0].headers["Host"] == f"[{PUBLIC6}]"


def test_dns_rebinding_cannot_swap_address() -> None:
    """The host is resolved once; the connection goes to that checked address."""
    answers = iter([[PUBLIC], ["127.0.0.1"], ["127.0.0.1"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    rec = Recorder()
    fetcher(rec, rebinding).fetch("http://rebind.example/")
    assert calls == ["rebind.example"]
    assert rec.requests[0].url.host == PUBLIC


# --------------------------------------------------------------------------- redirects


def redirect(location: str, status: int = 302) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(status, headers={"Location": location})


@pytest.mark.parametrize(
    "location",
    ["http://intranet.corp/secret", "http://127.0.0.1/", "http://[::ffff:10.0.0.1]/",
     "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd", "ftp://example.com/",
     "http://user:pw@example.com/", "http://2130706433/"],  # fmt: skip
)
def test_redirect_to_blocked_target_is_refused(location: str) -> None:
    rec = Recorder({"example.com/start": redirect(location)})
    dns = Dns({"example.com": [PUBLIC], "intranet.corp": ["10.0.0.9"]})
    with pytest.raises(BlockedURLError) as refused:
        fetcher(rec, dns).fetch("http://example.com/start")
    assert len(rec.requests) == 1  # the blocked hop is never requested
    # it says the refused address came from a redirect (it named only an address never given)
    assert str(refused.value).startswith("http://example.com/start: redirected to ")


def test_redirects_are_followed_and_each_hop_revalidated() -> None:
    rec = Recorder(
        {
            "example.com/a": redirect("/b", 301),  # relative: same host
            "example.com/b": redirect("https://other.org/c", 308),
        }
    )
    dns = Dns({"example.com": [PUBLIC], "other.org": ["8.8.4.4"]})
    page = fetcher(rec, dns).fetch("http://example.com/a")
    assert page.url == "http://example.com/a"
    assert page.final_url == "https://other.org/c"
    hosts = [(r.url.host, r.headers["Host"], r.url.path) for r in rec.requests]
    assert hosts == [(PUBLIC, "example.com", "/a"), (PUBLIC, "example.com", "/b"),
                     ("8.8.4.4", "other.org", "/c")]  # fmt: skip
    assert rec.requests[2].extensions["sni_hostname"] == "other.org"
    assert dns.calls == ["example.com", "example.com", "other.org"]


def test_too_many_redirects() -> None:
    rec = Recorder({f"example.com/{i}": redirect(f"/{i + 1}") for i in range(10)})
    dns = Dns({"example.com": [PUBLIC]})
    with pytest.raises(FetchError, match="more than 2 redirects"):
        fetcher(rec, dns, max_redirects=2).fetch("http://example.com/0")
    assert len(rec.requests) == 3
    # exactly max_redirects hops is fine
    assert fetcher(rec, dns, max_redirects=9).fetch("http://example.com/1").final_url.endswith(
        "/10"
    )


# --------------------------------------------------------------------------- responses


def test_body_over_cap_stops_reading_while_streaming() -> None:
    produced: list[int] = []

    def body() -> Iterator[bytes]:
        for i in range(1000):
            produced.append(i)
            yield b"x" * 1000

    rec = Recorder({"example.com/big": lambda: httpx.Response(
        200, headers={"Content-Type": "text/plain"}, content=body())})  # fmt: skip
    with pytest.raises(UnreadablePageError, match="over the 5000-byte cap"):  # 422, not 502
        fetcher(rec, Dns({"example.com": [PUBLIC]}), max_bytes=5000).fetch(
            "http://example.com/big"
        )
    assert len(produced) < 10  # stopped early, not after reading everything


def test_declared_length_over_cap_is_refused() -> None:
    rec = Recorder({"example.com/big": lambda: httpx.Response(
        200, headers={"Content-Type": "text/plain", "Content-Length": "99999"},
        content=b"x" * 99999)})  # fmt: skip
    with pytest.raises(FetchError, match="99999 bytes"):
        fetcher(rec, Dns({"example.com": [PUBLIC]}), max_bytes=1000).fetch(
            "http://example.com/big"
        )


@pytest.mark.parametrize("ctype", ["application/pdf", "image/png", "application/json", ""])
def test_refused_content_types(ctype: str) -> None:
    rec = Recorder({"example.com/x": lambda: httpx.Response(
        200, headers={"Content-Type": ctype} if ctype else {}, content=b"data")})  # fmt: skip
    with pytest.raises(UnreadablePageError, match="content type") as info:
        fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/x")
    assert (ctype or "(none)") in str(info.value)


def test_plain_text_charset_and_title() -> None:
    body = "Première ligne\nsecond line\n".encode("iso-8859-1")
    headers = {"Content-Type": "text/plain; charset=ISO-8859-1"}
    rec = Recorder({"example.com/t": lambda: httpx.Response(200, headers=headers, content=body)})
    page = fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/t")
    assert page.text == "Première ligne\nsecond line\n"
    assert page.title == "Première ligne"
    assert page.content_type == "text/plain"


@pytest.mark.parametrize(("path", "title"), [
    ("/r/README.md", "Proj"), ("/docs/guide.rst?raw=1", "Guide"), ("/notes", "[![ci](b.svg)](x)")])
def test_a_raw_markdown_or_rst_file_served_as_plain_text_is_titled_as_such(path: str,
                                                                           title: str) -> None:
    """A raw file's host serves .md and .rst as text/plain: their titles were plain text's."""
    text = {"/r/README.md": "[![ci](b.svg)](x)\n\n# Proj\n",
            "/docs/guide.rst": ":orphan:\n\nGuide\n=====\n",
            "/notes": "[![ci](b.svg)](x)\n\n# Proj\n"}[path.split("?")[0]]
    rec = Recorder({f"example.com{path.split('?')[0]}": lambda: httpx.Response(
        200, headers={"Content-Type": "text/plain"}, content=text.encode())})
    page = fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch(f"http://example.com{path}")
    assert page.title == title and page.text == text


@pytest.mark.parametrize(("ctype", "body", "want"), [
    # no charset in the header: the page's <meta> says latin-1
    ("text/html", '<meta charset="iso-8859-1"><p>Crème brûlée</p>'.encode("latin-1"),
     "Crème brûlée"),
    # a byte-order mark beats the header's (wrong) charset, and is no part of the text
    ("text/html; charset=iso-8859-1", "\ufeff<p>Crème</p>".encode("utf-8"), "Crème"),
    ("text/html", "<p>Crème</p>".encode("utf-16"), "Crème"),  # UTF-16 with its mark
    ("text/plain", "\ufeffplain café".encode("utf-8"), "plain café"),
    # as browsers read labels: latin-1 is windows-1252 (curly quotes, not C1 controls), and
    # a <meta> naming UTF-16 in an ASCII page means UTF-8
    ("text/html", b'<meta charset="utf-16"><p>plain</p>', "plain"),
    ("text/plain", b"stray\x00nul" + b" x" * 60, "stray\ufffdnul" + " x" * 60),  # one NUL
    ("text/html; charset=iso-8859-1", b"<p>\x93Caf\xe9\x94 \x85 ok</p>",
     "\u201cCaf\u00e9\u201d \u2026 ok"),
    # charsets Python knows by name that are no text encodings: read as UTF-8, not a crash
    *[(f"text/html; charset={name}", "<p>café</p>".encode(), "café")
      for name in ("idna", "hex", "base64", "rot13", "uu_codec", "punycode", "undefined")],
])
def test_a_page_is_decoded_by_its_mark_header_or_meta(ctype: str, body: bytes,
                                                      want: str) -> None:
    rec = Recorder({"example.com/p": lambda: httpx.Response(
        200, headers={"Content-Type": ctype}, content=body)})  # fmt: skip
    page = fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/p")
    assert page.text == want


def test_a_page_in_an_encoding_it_does_not_declare_is_refused() -> None:
    body = "<p>no mark</p>".encode("utf-16-le")  # NULs between the letters, read as UTF-8
    rec = Recorder({"example.com/p": lambda: httpx.Response(
        200, headers={"Content-Type": "text/html"}, content=body)})  # fmt: skip
    with pytest.raises(UnreadablePageError, match="NUL"):
        fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/p")


def test_a_page_refused_for_what_it_is_past_the_deadline_is_not_called_slow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """HTML that took its whole CPU budget to parse ran past the fetch's deadline, and the
    refusal (422, no use retrying) became "took longer than" (502, retry)."""
    import time as time_module

    import citeqa.ingest.fetch as fetch_module
    from citeqa.errors import SourceError

    def slow_unreadable(text: str, **_: object) -> object:
        time_module.sleep(0.3)  # past the 0.1 s deadline: the watchdog has fired
        raise SourceError("the HTML took over 14 s of CPU to parse")

    monkeypatch.setattr(fetch_module, "extract_html", slow_unreadable)
    rec = Recorder({"example.com/p": lambda: html_response()})
    with pytest.raises(UnreadablePageError, match="CPU to parse"):
        fetcher(rec, Dns({"example.com": [PUBLIC]}), timeout_s=0.1).fetch("http://example.com/p")


def test_html_without_title_uses_url_and_xhtml_accepted() -> None:
    rec = Recorder({"example.com/x": lambda: httpx.Response(
        200, headers={"Content-Type": "application/xhtml+xml"}, text="<p>body</p>")})  # fmt: skip
    page = fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/x")
    assert (page.text, page.title) == ("body", "http://example.com/x")
    for media, text in (("application/xhtml+xml", "x\n\nbody"), ("text/html", "body")):
        rec = Recorder({"example.com/y": lambda m=media: httpx.Response(  # type: ignore[misc]
            200, headers={"Content-Type": m}, text="<div hidden/>x</div><p>body</p>")})
        page = fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/y")
        assert page.text == text, media


@pytest.mark.parametrize("status", [404, 500, 204])
def test_error_status_is_a_fetch_error(status: int) -> None:
    rec = Recorder({"example.com/x": lambda: httpx.Response(status)})
    with pytest.raises(FetchError, match=f"HTTP {status}"):
        fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/x")


def test_connection_error_is_a_fetch_error() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(FetchError, match="could not connect"):
        fetcher(fail, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/")


def test_deadline_covers_all_hops() -> None:
    def slow_redirect() -> httpx.Response:
        time.sleep(0.15)
        return httpx.Response(302, headers={"Location": "/next"})

    rec = Recorder({"example.com/": slow_redirect, "example.com/next": slow_redirect})
    start = time.monotonic()
    with pytest.raises(FetchError, match="longer than 0.2s"):
        fetcher(rec, Dns({"example.com": [PUBLIC]}), timeout_s=0.2).fetch("http://example.com/")
    assert time.monotonic() - start < 1.0


def test_deadline_while_streaming_body() -> None:
    def drip() -> Iterator[bytes]:
        for _ in range(50):
            time.sleep(0.05)
            yield b"x"

    rec = Recorder({"example.com/": lambda: httpx.Response(
        200, headers={"Content-Type": "text/plain"}, content=drip())})  # fmt: skip
    start = time.monotonic()
    with pytest.raises(FetchError, match="longer than"):
        fetcher(rec, Dns({"example.com": [PUBLIC]}), timeout_s=0.3).fetch("http://example.com/")
    assert time.monotonic() - start < 1.5


def test_slow_dns_is_bounded_by_the_deadline() -> None:
    def slow(host: str, port: int) -> list[str]:
        time.sleep(2)
        return [PUBLIC]

    start = time.monotonic()
    with pytest.raises(FetchError, match="resolving"):
        fetcher(dns=slow, timeout_s=0.2).fetch("http://example.com/")
    assert time.monotonic() - start < 1.0


def test_a_slow_lookup_is_said_as_such_when_the_watchdog_fires_as_it_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI run's race: the watchdog fired as the lookup's own deadline passed, and the error
    was said again without "resolving"."""
    from citeqa.ingest import fetch as module

    enter = module._Watchdog.__enter__

    def fired_at_once(self: module._Watchdog) -> module._Watchdog:
        enter(self)
        self.fired = True
        return self

    def slow(host: str, port: int) -> list[str]:
        time.sleep(1)
        return [PUBLIC]

    monkeypatch.setattr(module._Watchdog, "__enter__", fired_at_once)
    with pytest.raises(FetchError, match="resolving 'example.com' took longer than 0.2s"):
        fetcher(dns=slow, timeout_s=0.2).fetch("http://example.com/")


# --------------------------------------------------------------------------- a real server


hosts_seen: list[str] = []  # Host headers the local server received


@pytest.fixture
def local_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "/page")
                self.end_headers()
                return
            hosts_seen.append(self.headers["Host"])
            body = b"<title>Local</title><p>served by a real server</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_real_local_server_needs_allow_private(local_server: str) -> None:
    page = Fetcher(FetchPolicy(allow_private=True, timeout_s=5)).fetch(f"{local_server}/hop")
    assert page.title == "Local"
    assert page.text == "served by a real server"
    assert page.final_url == f"{local_server}/page"
    with pytest.raises(BlockedURLError, match="loopback"):
        Fetcher(FetchPolicy(timeout_s=5)).fetch(f"{local_server}/page")


def test_real_local_server_by_name_sends_original_host(local_server: str) -> None:
    port = local_server.rsplit(":", 1)[1]
    dns = Dns({"docs.internal": ["127.0.0.1"]})
    policy = FetchPolicy(allow_private=True, timeout_s=5)
    hosts_seen.clear()
    page = Fetcher(policy, resolver=dns).fetch(f"http://docs.internal:{port}/page")
    assert page.text == "served by a real server"
    assert hosts_seen == [f"docs.internal:{port}"]
    refused = "docs.internal resolves to an address that is not allowed: it is a loopback"
    with pytest.raises(BlockedURLError, match=refused):
        Fetcher(FetchPolicy(timeout_s=5), resolver=dns).fetch(f"http://docs.internal:{port}/")


@pytest.mark.parametrize("location", ["http://a..b/", f"http://{PUBLIC}:99999999999999999999/",
                                      "http://[::1/x"])
def test_a_redirect_to_a_malformed_url_is_the_sites_fault(location: str) -> None:
    rec = Recorder({"example.com/": lambda: httpx.Response(302, headers={"Location": location})})
    with pytest.raises(FetchError, match="redirected to a bad URL") as info:
        fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/")
    assert not isinstance(info.value, BadURLError)


# --------------------------------------------------------------------------- content codings


class Chunks(httpx.SyncByteStream):
    """A response body that arrives in pieces, undecoded (as from the network)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks


def encoded(body: bytes, coding: str, *, ctype: str = "text/plain; charset=utf-8",
            split: int = 7) -> Callable[[], httpx.Response]:
    parts = [body[i:i + split] for i in range(0, len(body), split)] or [b""]
    return lambda: httpx.Response(200, headers={"Content-Type": ctype, "Content-Encoding": coding},
                                  stream=Chunks(*parts))


def gzipped(data: bytes, times: int = 1) -> bytes:
    import gzip

    for _ in range(times):
        data = gzip.compress(data)
    return data


TEXT = "Gzip and deflate are undone here, one layer, in bounded steps.\n" * 20


@pytest.mark.parametrize("split", [1, 7, 4096])
@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw deflate", "identity", "",
                                    "utf-8", "two gzip members", "gzip with zero padding"])
def test_one_layer_of_gzip_or_deflate_is_decoded(coding: str, split: int) -> None:
    """Whatever pieces the body arrives in (raw deflate is told from zlib-wrapped by its first
    two bytes); a name that is no compression (a server's "utf-8") is read as it is."""
    import zlib

    data = TEXT.encode()
    half = len(data) // 2
    body = {"gzip": gzipped(data), "x-gzip": gzipped(data), "deflate": zlib.compress(data),
            "raw deflate": zlib.compress(data)[2:-4],
            "two gzip members": gzipped(data[:half]) + gzipped(data[half:]),
            # zeros after the last member (a tape block's padding): gzip readers skip them
            "gzip with zero padding": gzipped(data) + b"\x00" * 20}.get(coding, data)
    header = {"raw deflate": "deflate", "two gzip members": "gzip",
              "gzip with zero padding": "gzip"}.get(coding, coding)
    rec = Recorder({"example.com/t": encoded(body, header, split=split)})
    page = fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/t")
    assert page.text == TEXT
    assert rec.requests[0].headers["Accept-Encoding"] == "gzip, x-gzip, deflate"


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_compressed_body_cut_short_or_empty(coding: str) -> None:
    import zlib

    data = TEXT.encode()
    whole = gzipped(data) if coding == "gzip" else zlib.compress(data)
    rec = Recorder({"example.com/cut": encoded(whole[: len(whole) // 2], coding),
                    "example.com/empty": encoded(b"", coding)})
    f = fetcher(rec, Dns({"example.com": [PUBLIC]}))
    with pytest.raises(FetchError, match="ends before its compressed stream does"):
        f.fetch("http://example.com/cut")
    assert f.fetch("http://example.com/empty").text == ""


@pytest.mark.parametrize("coding", ["gzip, gzip", "br", "zstd", "compress"])
def test_other_or_stacked_codings_are_refused(coding: str) -> None:
    rec = Recorder({"example.com/t": encoded(gzipped(TEXT.encode(), 2), coding)})
    with pytest.raises(FetchError, match="content encoding .* refused"):
        fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/t")


def test_a_compression_bomb_is_stopped_at_the_cap_while_decoding() -> None:
    """50 MB of zeros in ~50 KB of gzip, against a 1 MB cap: refused, and the decoder never hands
    over more than the room left plus one byte (httpx's own decoding inflated it whole)."""
    from citeqa.ingest.fetch import _Decoder

    bomb = gzipped(b"\0" * 50_000_000)
    assert len(bomb) < 100_000
    rec = Recorder({"example.com/b": encoded(bomb, "gzip", split=16_384)})
    with pytest.raises(FetchError, match="over the 1000000-byte cap"):
        fetcher(rec, Dns({"example.com": [PUBLIC]}), max_bytes=1_000_000).fetch(
            "http://example.com/b")
    decoder, room, handed = _Decoder("gzip"), 1_000_000, 0
    for piece in decoder.decode(bomb, room):
        handed += len(piece)
        if handed > room:
            break
    assert handed == room + 1


def test_a_damaged_gzip_body_is_a_fetch_error() -> None:
    body = gzipped(TEXT.encode())
    rec = Recorder({"example.com/t": encoded(body[:20] + b"\xff" * 30 + body[50:], "gzip"),
                    # zero padding is skipped, but nothing may follow it
                    "example.com/p": encoded(body + b"\x00" * 9 + b"x", "gzip", split=5)})
    f = fetcher(rec, Dns({"example.com": [PUBLIC]}))
    with pytest.raises(FetchError, match="gzip encoding is damaged"):
        f.fetch("http://example.com/t")
    with pytest.raises(FetchError, match="data after the zero padding"):
        f.fetch("http://example.com/p")


# --------------------------------------------------------------------------- hostile pages


def test_a_redirect_httpx_will_not_send_is_a_fetch_error() -> None:
    rec = Recorder({"example.com/": lambda: httpx.Response(302, headers={"Location":
                                                                         "http:\\\\x\\"})})
    with pytest.raises(FetchError, match="redirected to a bad URL"):
        fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/")


def test_a_redirect_or_refresh_to_an_address_that_cannot_be_parsed_is_no_crash() -> None:
    """A Location whose host IDNA refuses (httpx reads it as it sends: a UnicodeError), and a
    meta refresh urljoin refuses (a ValueError), escaped the fetch: a 500 over REST, and an
    index build cut short with a traceback."""
    rec = Recorder({
        "example.com/idna": redirect("http://xn--a.example/"),
        "example.com/refresh": lambda: html_response(
            '<meta http-equiv="refresh" content="0; url=http://[oops/"><p>moved</p>')})
    f = fetcher(rec, Dns({"example.com": [PUBLIC]}))
    with pytest.raises(FetchError, match="redirected to a bad URL"):
        f.fetch("http://example.com/idna")
    page = f.fetch("http://example.com/refresh")
    assert page.redirect == "http://[oops/"  # as written: shown, never fetched


def test_endless_empty_gzip_members_are_cut_at_the_cap_of_bytes_received() -> None:
    """They decode to nothing: only the deadline ended the fetch, its pieces piling up."""
    rec = Recorder({"example.com/e": encoded(gzipped(b"") * 200, "gzip", split=20)})
    with pytest.raises(UnreadablePageError, match="over the 1000-byte cap"):
        fetcher(rec, Dns({"example.com": [PUBLIC]}), max_bytes=1000).fetch(
            "http://example.com/e")
    rec = Recorder({"example.com/t": encoded(gzipped(b"ab" * 400), "gzip", split=2)})
    assert fetcher(rec, Dns({"example.com": [PUBLIC]}), max_bytes=1000).fetch(
        "http://example.com/t").text == "ab" * 400  # (a body in 2-byte pieces: one buffer)
    # a compressed body that does not shrink, decoded to the cap: its declared length is
    # held to the cap of bytes received, as the bytes counted are (it was refused, declared)
    import gzip
    import os

    data = os.urandom(500).hex().encode()[:1000]  # (hex: text, and gzip shrinks it little)
    body = gzip.compress(data, compresslevel=0)  # stored: longer than the data
    assert 1000 < len(body) <= 1125
    for declared in (True, False):
        headers = {"Content-Type": "text/plain", "Content-Encoding": "gzip",
                   **({"Content-Length": str(len(body))} if declared else {})}
        rec = Recorder({"example.com/s": lambda h=headers: httpx.Response(  # type: ignore[misc]
            200, headers=h, stream=Chunks(body))})
        page = fetcher(rec, Dns({"example.com": [PUBLIC]}), max_bytes=1000).fetch(
            "http://example.com/s")
        assert page.text == data.decode()


def test_html_the_parser_gives_up_on_is_an_unreadable_page() -> None:
    rec = Recorder({"example.com/": lambda: html_response("<p>x</p><![<![ y")})
    with pytest.raises(UnreadablePageError, match="HTML could not be parsed"):
        fetcher(rec, Dns({"example.com": [PUBLIC]})).fetch("http://example.com/")
    assert map_citeqa_error(UnreadablePageError("x")) == (422, "bad_source")  # no use retrying


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_server_sending_its_headers_a_byte_at_a_time_is_cut_at_the_deadline(
        scheme: str, tmp_path) -> None:
    """Each byte comes well within the per-read timeout, so only the fetch's own deadline (the
    watchdog shutting the socket) ends it; before, such a fetch never ended (and over https the
    first watchdog held a socket TLS had detached, so it did nothing)."""
    import shutil
    import ssl
    import subprocess

    transport = None
    server_tls = None
    if scheme == "https":
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed (it makes the test's certificate)")
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                       capture_output=True)
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, key)
        transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(cert)))
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        raw, _ = listener.accept()
        try:
            conn = server_tls.wrap_socket(raw, server_side=True) if server_tls else raw
        except (OSError, ssl.SSLError):
            return
        with conn:
            conn.recv(4096)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                if stop.wait(0.05):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    url = f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/"
    start = time.monotonic()
    try:
        with pytest.raises(FetchError, match="took longer than 1.0s"):
            Fetcher(FetchPolicy(allow_private=True, timeout_s=1.0), transport=transport).fetch(url)
        assert time.monotonic() - start < 10  # ends (it ran for ten minutes before)
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_page_key_names_a_page_whatever_the_url_spelling() -> None:
    from citeqa.ingest import page_key

    assert page_key("HTTPS://Example.COM:443/a?q=1#part") == "https://example.com/a?q=1"
    assert page_key("http://example.com:8080/A") == "http://example.com:8080/A"  # paths: as is
    assert page_key("https://example.com/a") != page_key("http://example.com/a")
    same = ["https://example.com", "https://example.com/", "https://example.com./",
            "https://EXAMPLE.com:443/#top"]  # one GET / on the wire
    assert {page_key(u) for u in same} == {"https://example.com/"}
    assert page_key("https://example.com/%7ea%2fb?x=%7e") == "https://example.com/~a%2Fb?x=~"
    assert page_key("http://[::1]:80/a") == "http://[::1]/a"
    assert page_key("http://[::1/") == "http://[::1/"  # does not parse: itself


def test_embedded_metadata_and_local_nat64_stay_refused_with_private_urls_allowed() -> None:
    """--allow-private-urls opens private addresses, never cloud metadata (here inside a Teredo
    address) nor the local-use NAT64 range; no test held either."""
    for ip in ("2001:0:a9fe:a9fe::1", "64:ff9b:1::1"):
        with pytest.raises(BlockedURLError):
            check_ip(ip, allow_private=True)


@pytest.mark.parametrize("host", ["1.256.0.1", "1.1.1.256", "1.16777216", "256.1.1.1"])
def test_a_numeric_host_with_a_part_too_large_is_a_bad_url(host: str) -> None:
    """Each part at its bound: one past it read as another address, not refused."""
    from citeqa.errors import BadURLError
    from citeqa.ingest.fetch import _numeric_ipv4

    with pytest.raises(BadURLError):
        _numeric_ipv4(host)
    assert _numeric_ipv4("1.255.0.255") == "1.255.0.255" and _numeric_ipv4("1.16777215") == (
        "1.255.255.255")


def test_a_page_exactly_as_long_as_the_cap_is_read() -> None:
    body = b"y" * 10
    page = Fetcher(FetchPolicy(max_bytes=10), transport=httpx.MockTransport(
        lambda r: httpx.Response(200, headers={"content-type": "text/plain",
                                               "content-length": "10"}, content=body)),
        resolver=lambda host, port: ["93.184.216.34"]).fetch("http://example.com/")
    assert page.text == "y" * 10
