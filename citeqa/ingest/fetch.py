"""The SSRF-safe URL fetcher: a web page's text, never a private or metadata address.

A URL is a security boundary: whoever supplies it must not be able to make the service talk to
its own network (loopback, intranet, cloud metadata). The rules, applied to the URL and again
to every redirect hop:

1. Only ``http``/``https``; no ``user:password@``; a well-formed host is required. A malformed
   URL or a host that does not exist is the caller's mistake (``BadURLError``, an API 422);
   a URL that is not allowed is ``BlockedURLError`` (400); a site or DNS that fails is a plain
   ``FetchError`` (502).
2. The host is resolved ONCE; every address it resolves to is checked with :func:`check_ip`
   and the fetch is refused if any is blocked. IP literals in any form (``[::ffff:127.0.0.1]``,
   ``2130706433``, ``0x7f.1``, ``127.1``) are checked as the address they denote.
3. The connection goes to the checked address itself (the URL's host is rewritten to the IP,
   the original name is sent as the ``Host`` header and, for https, as the TLS SNI / certificate
   name), so a second DNS answer (DNS rebinding) cannot swap the address.
4. Redirects are followed by hand (at most ``max_redirects``), body size is capped while
   streaming (and while decompressing: gzip and deflate are undone here, one layer at most, in
   bounded steps), one deadline covers the whole fetch (at it, the connection is shut down:
   per-read timeouts alone let a server that sends a byte at a time hold a fetch forever), and
   only text content types are accepted.

Environment proxies are ignored (``trust_env=False``): a proxy would connect by name.

Why one module of ~470 lines: these rules are one security boundary, and keeping every check
and the connection that depends on them in one file is what lets a reader audit it whole.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx

from citeqa.errors import (
    BadURLError,
    BlockedURLError,
    FetchError,
    SourceError,
    UnreadablePageError,
)
from citeqa.ingest.encoding import decode_page
from citeqa.ingest.html import extract_html
from citeqa.ingest.title import title_of_source
from citeqa.text import without_userinfo

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]  # (hostname, port) -> IP address strings

ACCEPTED_TYPES = ("text/html", "text/plain", "text/markdown", "application/xhtml+xml")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_REDIRECTS = (301, 302, 303, 307, 308)
_USER_AGENT = "citeqa/0.1 (document fetcher)"
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
              "deflate": zlib.MAX_WBITS}  # content codings undone here -> zlib wbits
_REFUSED_ENCODINGS = frozenset({"br", "zstd", "compress", "x-compress", "dcb", "dcz"})

# How an operator lets fetches reach their own network (an API request cannot).
OPT_IN = ("to fetch from your own network, opt in with --allow-private-urls (`citeqa index "
          "build` or `index add`), or CITEQA_ALLOW_PRIVATE_URLS=1 for `citeqa serve`")
# Cloud instance-metadata endpoints: blocked even with allow_private (they hand out credentials).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS DNS resolver
        "169.254.170.23",  # AWS EKS Pod Identity (credentials)
        "169.254.0.23",  # Tencent Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::253",  # AWS DNS over IPv6
        "fd00:ec2::23",  # AWS EKS Pod Identity over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wireserver
        "192.0.0.192",  # Oracle Cloud Classic
    )
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 shared address space
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # "this host on this network"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix, embeds an IPv4
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use NAT64
# Ranges this Python's is_global still calls global, though no public site is there.
_RESERVED = (
    ipaddress.ip_network("192.0.0.0/24"),  # IETF protocol assignments (less .9, .10: below)
    ipaddress.ip_network("5f00::/16"),  # SRv6 segment identifiers (RFC 9602)
    ipaddress.ip_network("3fff::/20"),  # documentation (RFC 9637)
)
_GLOBAL_ANYCAST = frozenset(ipaddress.ip_address(a) for a in ("192.0.0.9", "192.0.0.10"))
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")  # one label of a (lower-case, IDNA-encoded) host name
# getaddrinfo's answers for a name that has no address: the URL's mistake, not the network's
_NO_SUCH_HOST = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})


class _TookTooLongError(FetchError):
    """A fetch ran past its deadline, and says where (resolving, say): kept as it is when the
    watchdog fires meanwhile (it was then said again without the where)."""


@dataclass(frozen=True)
class FetchPolicy:
    """What the fetcher may do. The defaults are safe for a public service."""

    allow_private: bool = False  # allow loopback/private/link-local/CGNAT (explicit opt-in)
    max_bytes: int = 5_000_000  # largest (decompressed) body read; larger -> UnreadablePageError
    timeout_s: float = 20.0  # total time for the whole fetch, DNS and redirects included
    max_redirects: int = 5  # redirect hops followed before giving up


@dataclass(frozen=True)
class FetchedPage:
    """A fetched page with its extracted text."""

    url: str  # as requested
    final_url: str  # after redirects
    content_type: str  # media type without parameters, e.g. "text/html"
    text: str  # extracted text (HTML -> visible text; plain text unchanged)
    title: str  # <title>, a title from plain text (title_from_text), or the URL
    redirect: str | None = None  # an HTML page that only redirects (a meta refresh): where to

    def only_redirects(self) -> str | None:
        """Why the page is not worth indexing when it only redirects (``HtmlText.redirect``),
        else None: said as a skip (a build) or a 422 (REST)."""
        if self.redirect is None:
            return None
        return (f"the page only redirects to {self.redirect} (a meta refresh): index that "
                "URL")


_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _percent(m: re.Match[str]) -> str:
    """One %XX escape as RFC 3986 normalises it: an unreserved character as itself, any other
    in upper-case hex."""
    char = chr(int(m.group(1), 16))
    return char if char in _UNRESERVED else "%" + m.group(1).upper()


def page_key(url: str) -> str:
    """What names one page among URLs (RFC 3986's normal form, less the fragment): scheme and
    host in lower case, the host without a trailing dot, no default port, ``/`` for an empty
    path, escapes of unreserved characters decoded and the others in upper case
    (``HTTPS://Example.com.:443/%7ea#b`` -> ``https://example.com/~a``); ``url`` itself where it
    does not parse (a string that is no absolute URL gets some key no fetched page has)."""
    try:
        u = httpx.URL(url)
        u = u.copy_with(host=u.host.rstrip("."), fragment=None)
        target = _PERCENT_RE.sub(_percent, u.raw_path.decode("ascii"))  # path and query
        return f"{u.scheme}://{u.netloc.decode('ascii')}{target}"
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
        return url


# --------------------------------------------------------------------------- address rules


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses carried inside an IPv6 address (mapped, compatible, 6to4, Teredo, NAT64)."""
    n = int(ip)
    out: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        out.append(ip.ipv4_mapped)
    if n >> 32 == 0 and n > 1:  # ::a.b.c.d (deprecated IPv4-compatible)
        out.append(ipaddress.IPv4Address(n & 0xFFFFFFFF))
    if n >> 32 == 0xFFFF0000:  # ::ffff:0:a.b.c.d (SIIT IPv4-translated)
        out.append(ipaddress.IPv4Address(n & 0xFFFFFFFF))
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(n & 0xFFFFFFFF))
    if ip.sixtofour is not None:  # 2002:aabb:ccdd::/48
        out.append(ip.sixtofour)
    if ip.teredo is not None:  # 2001:0::/32 -> (server, client)
        out.extend(ip.teredo)
    return out


def _block_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> str:
    """Why ``ip`` is blocked under the policy, or "" when it is allowed."""
    # Never allowed, whatever the policy.
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if any(ip in net for net in _RESERVED if net.version == ip.version) and (
            ip not in _GLOBAL_ANYCAST):
        return "a reserved address"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip == ipaddress.IPv4Address("255.255.255.255"):
            return "the broadcast address"
        if ip in _THIS_NETWORK:
            return "a 'this network' (0.0.0.0/8) address"
        if ip.is_reserved:
            return "a reserved address"
    else:
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        for inner in _embedded_ipv4(ip):
            reason = _block_reason(inner, allow_private)
            if reason:
                return f"an IPv6 address embedding an IPv4 one ({reason})"
        if ip.sixtofour is not None:  # judged by the IPv4 inside it, just checked: Python's
            return ""  # table calls all of 2002::/16 private from 3.11.10, 3.12.4 and 3.13 on
    # Allowed only with allow_private.
    if allow_private:
        return ""
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip in _CGNAT:
        return "a carrier-grade NAT (100.64.0.0/10) address"
    if ip.is_private:
        return "a private address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if not ip.is_global:
        return "a non-public address"
    return ""


def check_ip(ip: str, *, allow_private: bool = False) -> None:
    """Raise :class:`BlockedURLError` unless ``ip`` may be fetched from.

    Blocked: loopback, private (RFC 1918, fc00::/7), link-local, CGNAT, multicast, unspecified,
    reserved/broadcast, cloud metadata, and IPv6 forms embedding such an IPv4 address.
    ``allow_private`` lets loopback/private/link-local/CGNAT through, but never metadata,
    unspecified, multicast or reserved addresses.
    """
    text = ip.strip().strip("[]").split("%", 1)[0]  # brackets and IPv6 zone ids are not part
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise BlockedURLError(f"{ip!r} is not an IP address; refusing to connect to it") from None
    if refusal := _refusal(addr, allow_private):
        raise BlockedURLError(f"refusing to fetch from {addr}: {refusal}")


def _refusal(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> str:
    """Why ``addr`` may not be fetched from ("it is ..." and how to opt in where one may),
    without the address itself; "" when it may."""
    reason = _block_reason(addr, allow_private)
    if not reason:
        return ""
    opt_in = not allow_private and not _block_reason(addr, True)
    return f"it is {reason}" + (f" ({OPT_IN})" if opt_in else "")


def _numeric_ipv4(host: str) -> str | None:
    """The IPv4 address an ``inet_aton``-style host denotes (``2130706433``, ``0x7f.1``,
    ``017700000001``, ``127.1``), or None when ``host`` is a name.

    Raises BadURLError for all-numeric hosts that denote no address (``1.2.3.4.5``).
    """
    parts = host.rstrip(".").split(".")

    def number(part: str) -> int | None:
        p = part.lower()
        try:
            if p.startswith("0x"):
                return int(p[2:] or "0", 16)
            if len(p) > 1 and p.startswith("0"):
                return int(p[1:], 8)
            return int(p, 10) if p.isdigit() else None
        except ValueError:
            return None

    nums = [number(p) for p in parts]
    if not parts or any(n is None for n in nums):
        # a name, unless its last label is numeric (WHATWG treats that as a broken IPv4)
        if parts and parts[-1] and number(parts[-1]) is not None:
            raise BadURLError(f"host {host!r} is neither a name nor a valid IPv4 address")
        return None
    values = [n for n in nums if n is not None]
    if len(values) > 4 or any(v > 255 for v in values[:-1]):
        raise BadURLError(f"host {host!r} is not a valid IPv4 address")
    last_bytes = 5 - len(values)  # the last part fills the remaining bytes
    if values[-1] >= 256**last_bytes:
        raise BadURLError(f"host {host!r} is not a valid IPv4 address")
    n = 0
    for v in values[:-1]:
        n = (n << 8) | v
    n = (n << (8 * last_bytes)) | values[-1]
    return str(ipaddress.IPv4Address(n))


def _host_name_error(name: str) -> str:
    """Why ``name`` (lower case, IDNA-encoded, no trailing dot) is not a host name, or "".

    Labels of 1-63 letters, digits, "-" and "_" (underscores occur in real names), at least one
    a letter or digit, 253 characters in all (RFC 1035). Checked before DNS, so that a typo is
    the caller's mistake rather than a resolver failure.
    """
    if len(name) > 253:
        return "is longer than 253 characters"
    for label in name.split("."):
        if not label:
            return "has an empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"has a label of {len(label)} characters (at most 63)"
        if not _LABEL.fullmatch(label) or not any(c.isalnum() for c in label):
            return f"has a label {label!r} that is not letters, digits, '-' and '_'"
    return ""


def _default_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


# --------------------------------------------------------------------------- the fetcher


@dataclass(frozen=True)
class _Target:
    """A validated hop: where to connect and what to tell the server."""

    url: httpx.URL  # the URL as given (for messages, redirects and Host)
    connect_url: httpx.URL  # the same URL with the host replaced by the checked IP
    host_header: str  # original host[:port]
    sni: str | None  # hostname for TLS SNI and certificate checks (https only)


class Fetcher:
    """Fetches http(s) pages under a :class:`FetchPolicy` (see the module docstring).

    ``transport`` replaces the network (tests pass ``httpx.MockTransport``); ``resolver``
    replaces DNS: ``resolver(host, port)`` returns the host's IP addresses.
    """

    def __init__(
        self,
        policy: FetchPolicy = FetchPolicy(),  # noqa: B008 - frozen, safe as a default
        *,
        transport: httpx.BaseTransport | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.policy = policy
        self._transport = transport
        self._resolver = resolver or _default_resolver

    def fetch(self, url: str) -> FetchedPage:
        """Fetch ``url`` and extract its text.

        Raises:
            BadURLError: the URL is malformed or its host does not exist.
            BlockedURLError: the URL, or a redirect, points somewhere not allowed.
            FetchError: network error, bad status, too large, too slow, refused content type.
        """
        deadline = time.monotonic() + self.policy.timeout_s
        try:
            current = httpx.URL(url.strip())
        except (httpx.InvalidURL, TypeError, ValueError) as e:
            raise BadURLError(f"{url!r} is not a valid URL: {e}") from None
        watchdog = _Watchdog(deadline)
        try:
            with httpx.Client(
                transport=self._transport,
                follow_redirects=False,
                trust_env=False,
                headers={"User-Agent": _USER_AGENT, "Accept": ", ".join(ACCEPTED_TYPES),
                         "Accept-Encoding": ", ".join(_ENCODINGS)},
            ) as client, watchdog:
                return self._follow(client, url, current, deadline, watchdog)
        except FetchError as e:
            # what failed on the network did so because the deadline cut its connection; a page
            # refused for what it is (unreadable HTML, too large) stays refused for that
            if watchdog.fired and not isinstance(e, UnreadablePageError | _TookTooLongError):
                raise _TookTooLongError(f"{url}: took longer than {self.policy.timeout_s}s"
                                        ) from None
            raise

    def _follow(self, client: httpx.Client, url: str, current: httpx.URL, deadline: float,
                watchdog: _Watchdog) -> FetchedPage:
        """The redirect loop of ``fetch``."""
        for hop in range(self.policy.max_redirects + 1):
            try:
                target = self._validate(current, deadline,
                                        shown=url.strip() if hop == 0 else None)
            except BadURLError as e:
                if hop == 0:
                    raise
                # a redirect to a bad URL is the site's mistake, not the caller's
                raise FetchError(f"{url}: redirected to a bad URL: {e}") from None
            except BlockedURLError as e:
                if hop == 0:
                    raise
                # said alone, the refusal named an address the caller never gave
                raise BlockedURLError(f"{url}: redirected to {without_userinfo(str(current))}, "
                                      f"which is refused: {e}") from None
            location, page = self._get(client, target, url, deadline, watchdog)
            if page is not None:
                return page
            assert location is not None, "a hop returns either a page or a redirect"
            try:
                current = target.url.join(location)
            except httpx.InvalidURL as e:
                raise FetchError(f"{url}: bad redirect Location {location!r}: {e}") from None
            logger.debug("redirect %d: %s -> %s", hop + 1, target.url, current)
        raise FetchError(
            f"{url}: more than {self.policy.max_redirects} redirects; use the final URL directly"
        )

    def _validate(self, url: httpx.URL, deadline: float, shown: str | None = None) -> _Target:
        """Check scheme, userinfo and host of one hop; resolve and check its addresses.
        Messages name ``shown`` (what the user wrote) when given: httpx may print a broken
        URL differently (``http://:80/`` as ``http:/``)."""
        where = without_userinfo(shown or str(url))  # a password is not said back
        if url.scheme not in ("http", "https"):
            raise BlockedURLError(
                f"{where}: scheme {url.scheme or '(none)'!r} is not allowed; use http or https"
            )
        if url.userinfo:
            raise BlockedURLError(f"{where}: credentials in URLs are not allowed; remove 'user@'")
        host = url.raw_host.decode("ascii").lower()
        if not host:
            raise BadURLError(f"{where}: the URL has no host")
        if url.port is not None and not 1 <= url.port <= 65535:  # the resolver took any
            # number and wrapped it (65616 fetched port 80), or failed deep in a connect (500)
            raise BadURLError(f"{where}: port {url.port} is not a port (1-65535); check the URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        allow = self.policy.allow_private
        if ":" in host:  # an IPv6 literal (httpx strips the brackets)
            addresses = [host.split("%", 1)[0]]
        elif (ipv4 := _numeric_ipv4(host)) is not None:
            addresses = [ipv4]
        else:
            name = host.rstrip(".")
            if reason := _host_name_error(name):
                raise BadURLError(f"{where}: the host {reason}; check the URL")
            if not allow and (name == "localhost" or name.endswith(".localhost")):
                raise BlockedURLError(
                    f"{where}: {name!r} is this machine ({OPT_IN})"
                )
            addresses = self._resolve(name, port, deadline)
            for address in addresses:  # named without the address: a caller of a server
                # must not learn what an internal name resolves to (the log keeps it)
                try:
                    addr = ipaddress.ip_address(address.split("%", 1)[0])
                except ValueError:
                    continue  # not an address at all: check_ip below says so
                if refusal := _refusal(addr, allow):
                    logger.info("refused %s: %s resolves to %s", where, host, address)
                    raise BlockedURLError(f"{where}: {host} resolves to an address that is "
                                          f"not allowed: {refusal}")
        for address in addresses:
            check_ip(address, allow_private=allow)
        ip = ipaddress.ip_address(addresses[0].split("%", 1)[0])
        return _Target(
            url=url,
            connect_url=url.copy_with(host=str(ip)),
            host_header=url.netloc.decode("ascii"),
            sni=host.rstrip(".") if url.scheme == "https" else None,
        )

    def _resolve(self, host: str, port: int, deadline: float) -> list[str]:
        """All addresses of ``host``; DNS runs in a thread so the deadline bounds it."""
        result: list[list[str]] = []
        error: list[Exception] = []

        def run() -> None:
            try:
                result.append(list(self._resolver(host, port)))
            except Exception as e:  # re-raised in the caller's thread
                error.append(e)

        thread = threading.Thread(target=run, name=f"resolve {host}", daemon=True)
        thread.start()
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            raise _TookTooLongError(f"resolving {host!r} took longer than {self.policy.timeout_s}s")
        if error:
            raise _resolve_error(host, error[0])
        addresses = sorted(set(result[0]), key=result[0].index)
        if not addresses:
            raise BadURLError(f"host {host!r} resolved to no address; check the URL")
        return addresses

    def _get(
        self, client: httpx.Client, target: _Target, requested: str, deadline: float,
        watchdog: _Watchdog,
    ) -> tuple[str | None, FetchedPage | None]:
        """One GET: (redirect location, None) or (None, page)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _TookTooLongError(f"{requested}: took longer than {self.policy.timeout_s}s")
        request = client.build_request(
            "GET",
            target.connect_url,
            headers={"Host": target.host_header},
            timeout=httpx.Timeout(remaining),
            extensions={"trace": watchdog.trace,
                        **({"sni_hostname": target.sni} if target.sni else {})},
        )
        try:
            response = client.send(request, stream=True)
        except httpx.TimeoutException:
            raise FetchError(f"{requested}: timed out after {self.policy.timeout_s}s") from None
        except httpx.HTTPError as e:  # (httpx reads a redirect's Location as it sends)
            bad = str(e).startswith("Invalid URL in location header")
            raise FetchError(f"{requested}: redirected to a bad URL: {e}" if bad else
                             f"{requested}: could not connect to {target.url.host}: {e}") from None
        # a redirect httpx parsed but will not send, or to a host IDNA refuses (xn--a)
        except (httpx.InvalidURL, UnicodeError, ValueError) as e:
            raise FetchError(f"{requested}: redirected to a bad URL: {e}") from None
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise FetchError(f"{requested}: redirect without a Location header")
                return location, None
            if response.status_code != 200:
                raise FetchError(
                    f"{requested}: the server answered HTTP {response.status_code} "
                    f"for {target.url}"
                )
            media = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if media not in ACCEPTED_TYPES:
                raise UnreadablePageError(
                    f"{requested}: content type {media or '(none)'!r} refused; only "
                    f"{', '.join(ACCEPTED_TYPES)} pages can be indexed"
                )
            body = self._read(response, requested, deadline)
        finally:
            response.close()
        text = decode_page(body, response.charset_encoding, html=media in _HTML_TYPES)
        if text.count("\x00") * 100 > len(text):  # UTF-16 it does not declare, or binary
            raise UnreadablePageError(
                f"{requested}: the page is binary or in an encoding it does not declare "
                "(NUL characters all through it)")
        text = text.replace("\x00", "\ufffd")  # a stray one, as an HTML parser reads it
        final = str(target.url)
        if media in _HTML_TYPES:
            try:
                extracted = extract_html(text, xml=media == "application/xhtml+xml")
            except SourceError as e:
                raise UnreadablePageError(f"{requested}: {e}") from None
            return None, FetchedPage(
                url=requested,
                final_url=final,
                content_type=media,
                text=extracted.text,
                title=extracted.title or final,
                redirect=(None if (to := extracted.redirect()) is None
                          else _refresh_target(final, to)),
            )
        title = title_of_source(text, final, final, markdown=media == "text/markdown")
        return None, FetchedPage(requested, final, media, text, title)

    def _read(self, response: httpx.Response, requested: str, deadline: float) -> bytes:
        """The (decompressed) body, refusing more than max_bytes (decoded, or received: endless
        empty gzip members decode to nothing) or reading past the deadline."""
        limit = self.policy.max_bytes
        coding = response.headers.get("Content-Encoding", "")
        # bytes received: a compressed body's may pass its decoded cap by gzip's overhead on
        # what does not shrink (the declared length and the bytes counted, the same cap)
        received_cap = limit + limit // 8 if coding.strip() else limit
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > received_cap:
            raise UnreadablePageError(
                f"{requested}: body of {declared} bytes is over the {limit}-byte cap")
        raw_chunks: Callable[[], Iterator[bytes]] = response.iter_raw
        if response.is_stream_consumed:  # built in memory (a test's httpx.MockTransport):
            coding, raw_chunks = "", lambda: iter([response.content])  # read, decoded by httpx
        try:
            decoder = _Decoder(coding)
        except ValueError:
            raise UnreadablePageError(f"{requested}: content encoding {coding!r} refused; only "
                             f"{', '.join(_ENCODINGS)} or none") from None
        # one buffer: a list of the pieces a body of 2-byte chunks came in cost ~25x its size
        # (135 MB for a body under the 5 MB cap)
        body = bytearray()
        received = 0
        try:
            for raw in _then_end(raw_chunks()):
                received += len(raw)
                if received > received_cap:
                    raise UnreadablePageError(f"{requested}: body is over the {limit}-byte cap")
                for chunk in decoder.decode(raw, limit - len(body)):
                    body += chunk
                    if len(body) > limit:
                        raise UnreadablePageError(f"{requested}: body is over the {limit}-byte cap")
                if time.monotonic() > deadline:
                    raise _TookTooLongError(
                        f"{requested}: took longer than {self.policy.timeout_s}s")
        except httpx.TimeoutException:
            raise FetchError(f"{requested}: timed out after {self.policy.timeout_s}s") from None
        except httpx.HTTPError as e:
            raise FetchError(f"{requested}: error while reading the body: {e}") from None
        except zlib.error as e:
            raise FetchError(f"{requested}: the body's {coding} encoding is damaged ({e})"
                             ) from None
        return bytes(body)


def _refresh_target(final: str, to: str) -> str:
    """Where a page's meta refresh sends, resolved against the page's URL (``to`` as written
    where it is no URL one can parse: "http://[oops/", a ValueError that failed the fetch)."""
    try:
        return without_userinfo(urljoin(final, to))
    except ValueError:
        return without_userinfo(to)


def _then_end(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks``, then b"" to mark their end (the decoder then flushes)."""
    yield from chunks
    yield b""


class _Decoder:
    """Undoes a response's content coding (none, or one gzip or deflate layer) in bounded
    steps. httpx decodes every stacked coding of a chunk at once, unbounded: a 265-byte body
    sent as ``gzip, gzip, gzip`` became a gigabyte in memory before any size cap was checked.
    Compressions not undone here (br, zstd, compress, or several) are refused; any other name
    (``identity``, or a server's nonsense such as ``utf-8``) is read as it is, as httpx did."""

    def __init__(self, coding: str) -> None:
        names = [c.strip().lower() for c in coding.split(",")]
        codings = [c for c in names if c in _ENCODINGS or c in _REFUSED_ENCODINGS]
        if len(codings) > 1 or (codings and codings[0] not in _ENCODINGS):
            raise ValueError(f"unsupported content coding {coding!r}")
        self._coding = codings[0] if codings else None
        self._z: Any = None  # deflate: made once the first two bytes say zlib-wrapped or raw
        if self._coding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(_ENCODINGS[self._coding])
        self._head = b""  # deflate's first bytes, until there are two
        self._seen = False  # whether any body byte came
        self._padded = False  # gzip: zero bytes came after the last member (only zeros may)

    def decode(self, data: bytes, room: int) -> Iterator[bytes]:
        """The decoded pieces of ``data`` (b"": the end), never more than ``room`` + 1 bytes
        beyond what the caller has counted: past that the caller stops. zlib.error for a
        damaged or cut compressed stream."""
        if self._coding is None:
            yield data
            return
        self._seen = self._seen or bool(data)
        if self._z is None:
            self._head += data
            if data and len(self._head) < 2:
                return
            # "deflate" is zlib-wrapped (RFC 9110), but some servers send it raw
            self._z = zlib.decompressobj(zlib.MAX_WBITS if _zlib_header(self._head)
                                         else -zlib.MAX_WBITS)
            data, self._head = self._head, b""
            if not data:  # an empty body: nothing to undo
                return
        if not data:  # the end
            yield self._z.flush()
            if self._seen and not self._z.eof:
                raise zlib.error("the body ends before its compressed stream does")
            return
        if self._padded:
            if data.strip(b"\x00"):
                raise zlib.error("data after the zero padding that ends the stream")
            return
        while data:
            out = self._z.decompress(data, max(room, 0) + 1)
            room -= len(out)
            yield out
            data = self._z.unconsumed_tail
            if not data and self._z.eof and self._z.unused_data and self._coding != "deflate":
                data = self._z.unused_data  # a gzip body may hold several members in a row
                if not data.strip(b"\x00"):  # or zero padding after the last (gzip readers
                    self._padded = True  # skip it, as Python's gzip module and browsers do)
                    return
                self._z = zlib.decompressobj(_ENCODINGS[self._coding])


def _zlib_header(head: bytes) -> bool:
    """Whether ``head`` starts a zlib stream (RFC 1950: deflate method, header checksum)."""
    return len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] * 256 + head[1]) % 31 == 0


class _Watchdog:
    """Cuts a fetch's connections at its deadline. httpx's timeouts bound each socket operation,
    not the whole fetch: a server sending its headers a byte every few seconds never trips them
    and held a thread of the service forever. httpcore's trace hook (``trace``) hands over each
    new connection's socket, of which a duplicate is kept (TLS wraps, and so detaches, the
    original; a duplicate's number is never reused while kept); at the deadline they are shut
    down, which ends a blocked read on the connection at once, and the fetch fails (``fired``
    says why). A context manager: leaving it disarms it and closes the duplicates."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._disarmed = False
        self.fired = False

    def __enter__(self) -> _Watchdog:
        self._timer = threading.Timer(max(self._deadline - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._timer is not None, "entered before leaving"
        self._timer.cancel()
        with self._lock:  # a firing in progress ends before the connections are closed
            self._disarmed = True
            for sock in self._sockets:
                sock.close()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event != "connection.connect_tcp.complete":
            return
        sock = info["return_value"].get_extra_info("socket")
        if sock is None:
            return
        with self._lock:
            if self._disarmed:
                return
            self._sockets.append(sock.dup())
            if self.fired:
                _shutdown(self._sockets[-1])

    def _fire(self) -> None:
        with self._lock:
            if self._disarmed:
                return
            self.fired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _resolve_error(host: str, e: Exception) -> FetchError:
    """A failed lookup: BadURLError when the name does not exist (or cannot be a name), else a
    FetchError (DNS unreachable or failing: not the caller's mistake)."""
    if isinstance(e, UnicodeError):  # the idna codec refused the name
        return BadURLError(f"host {host!r} is not a valid host name ({e}); check the URL")
    if isinstance(e, socket.gaierror) and e.errno in _NO_SUCH_HOST:
        return BadURLError(f"host {host!r} does not exist ({e.strerror}); check the URL")
    return FetchError(f"could not resolve {host!r}: {e}; try again later or check the URL")

