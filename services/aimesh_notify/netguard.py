"""Which webhook URLs the service may call: the SSRF guard.

A webhook URL is chosen by a caller, and the service POSTs to it from inside
the mesh. Without a guard anyone with notify.write could make the service
reach what only the mesh can reach: the cloud metadata endpoint
(169.254.169.254, fd00:ec2::254) and its credentials, the pod's own loopback
(admin ports, sidecars), cluster services on private addresses. So a URL must
be http(s) and every address its host resolves to must be globally routable
(`is_global`) and lie outside DENIED, a second check that also names the
reason. An IPv6 address that embeds an IPv4 one (mapped, compatible,
translated, NAT64, 6to4, Teredo) is checked for the embedded one too: a tunnel
or translator on the host would deliver to it.
The check runs at creation and again before every attempt, against the
addresses then resolved, and the request goes to the checked address itself
(Host header and TLS SNI keep the name): a name re-pointed after the check
(DNS rebinding) cannot slip through. Redirects are not followed.

AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS=1 turns the network check off, for a
laptop or a test whose receiver listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges a webhook may never reach, with why.
DENIED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this host / unspecified"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, incl. cloud metadata 169.254.169.254"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, incl. broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated), can reach any IPv4 address"),
    ("::ffff:0:0:0/96", "IPv4-translated (SIIT), can reach any IPv4 address"),
    ("64:ff9b::/96", "NAT64, can reach any IPv4 address"),
    ("64:ff9b:1::/48", "local NAT64"),
    ("100::/64", "discard"),
    ("2001::/32", "Teredo, can reach any IPv4 address"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4, can reach any IPv4 address"),
    ("fc00::/7", "unique local, incl. metadata fd00:ec2::254"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_NETWORKS = tuple((ipaddress.ip_network(net), why) for net, why in DENIED)


class DeniedUrl(ValueError):
    """The URL may not be called; the message says why."""


# Prefixes whose last 32 bits are an IPv4 address a translator or tunnel reaches.
_EMBEDDING_V4 = tuple(
    ipaddress.IPv6Network(net) for net in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")
)


def denial(address: IPAddress) -> str | None:
    """Why this address is denied, or None if it is allowed."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    why = _listed(address)
    if why is not None:
        return why
    for embedded in _embedded_ipv4(address):
        inner = _listed(embedded) or _not_global(embedded)
        if inner is not None:
            return f"{address} embeds {inner}"
    return _not_global(address)


def _listed(address: IPAddress) -> str | None:
    for network, why in _NETWORKS:
        if address.version == network.version and address in network:
            return f"{address} is {why}"
    return None


def _not_global(address: IPAddress) -> str | None:
    return None if address.is_global else f"{address} is not globally routable"


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [
        ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        for network in _EMBEDDING_V4
        if address in network
    ]
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


@dataclass(frozen=True)
class Target:
    """A checked URL: its host, and the address to connect to (None: let the
    client resolve, when the guard is off)."""

    url: str
    scheme: str
    host: str
    port: int
    address: str | None


def parse(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of an http(s) URL, or DeniedUrl."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise DeniedUrl(f"not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DeniedUrl("the scheme must be http or https")
    if not parts.hostname:
        raise DeniedUrl("the URL has no host")
    if parts.username or parts.password:
        raise DeniedUrl("credentials in the URL are not allowed; sign with the secret instead")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


_PARSED_KEPT = 4096  # URLs whose parse is remembered; beyond, forget and start over


class NetworkGuard:
    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        # A URL's scheme, host and port never change: parse it once. What the
        # host resolves to can, so that is looked up and checked every time.
        self._parsed: dict[str, tuple[str, str, int] | DeniedUrl] = {}

    def _parse(self, url: str) -> tuple[str, str, int]:
        parsed = self._parsed.get(url)
        if parsed is None:
            try:
                parsed = parse(url)
            except DeniedUrl as error:
                parsed = error
            if len(self._parsed) >= _PARSED_KEPT:
                self._parsed.clear()
            self._parsed[url] = parsed
        if isinstance(parsed, DeniedUrl):
            raise DeniedUrl(str(parsed))
        return parsed

    async def check(self, url: str) -> Target:
        """Resolve and check `url`; DeniedUrl if any of its addresses is denied."""
        scheme, host, port = self._parse(url)
        if self.allow_private:
            return Target(url, scheme, host, port, None)
        addresses = await resolve(host, port)
        for address in addresses:
            why = denial(address)
            if why is not None:
                raise DeniedUrl(f"{host} resolves to a denied network: {why}")
        return Target(url, scheme, host, port, str(addresses[0]))


async def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except OSError as error:
        raise DeniedUrl(f"{host} does not resolve: {error}") from None
    found: list[IPAddress] = []
    for info in infos:
        # Strip an IPv6 zone ("fe80::1%eth0") before parsing.
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise DeniedUrl(f"{host} does not resolve")
    return found
