"""Network policy: which addresses the engine may connect to, and URLs stripped of credentials.

Pure functions (no aiohttp): engine/plan.py refuses IP-literal URLs with them before any download,
engine/fetch.py applies them at connection time (its resolver and its per-request check).
By default only public unicast addresses are fetched; --allow-private-network lifts the rule.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Allowed = Callable[[str], bool]
"""An address rule: the textual address a host resolved to -> whether the engine may connect to it."""

NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the last 32 bits are IPv4
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use NAT64: a site's own network
# The userinfo part of an absolute URL: everything of the authority up to its last "@" (as urlsplit
# and yarl read it). RE2 (pyarrow) and Python's re both accept this pattern.
CREDENTIALS = r"^(\s*[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@"
_CREDENTIALS = re.compile(CREDENTIALS)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 transition address really reaches (mapped, 6to4, Teredo, NAT64)."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): the client is the host being reached
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(address: str | IPAddress) -> bool:
    """Whether `address` is a public unicast address, the only kind fetched by default.

    Loopback, private, link-local, site-local, shared (CGNAT), multicast, reserved, documentation
    and unspecified addresses are not; an IPv6 address that embeds an IPv4 one is judged by that.
    Anything unparsable is not public.
    """
    try:
        ip = address if not isinstance(address, str) else ipaddress.ip_address(address)
    except ValueError:
        return False
    inner = embedded_ipv4(ip)
    if inner is not None:
        return is_public(inner)
    if ip.version == 6 and (ip.is_site_local or ip in NAT64_LOCAL):
        return False
    # is_global alone lets multicast (224/4, ff0e::/16) through; reserved and 0.0.0.0 are spelled out
    # so the rule does not depend on the Python version's tables.
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def literal_address(host: str | None) -> IPAddress | None:
    """The address a URL host names without DNS: IPv4/IPv6 literals and the legacy numeric IPv4
    forms the C library accepts (2130706433, 0x7f.1, 0177.0.0.1, 127.1); None for a name."""
    if not host:
        return None
    host = host.strip("[]").rstrip(".") if ":" not in host else host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host or not host:
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def refused_host(host: str | None, allowed: Allowed = is_public) -> str | None:
    """Why the policy refuses a host that is an IP literal, or None (names are judged after DNS)."""
    ip = literal_address(host)
    if ip is None or allowed(str(ip)):
        return None
    meant = embedded_ipv4(ip) or ip
    shown = host if str(meant) == host else f"{host} ({meant})"
    return f"{shown} is not a public address (--allow-private-network fetches it)"


def refused_url(url: str) -> str | None:
    """Why the policy refuses this URL's host before any DNS lookup, or None."""
    try:
        return refused_host(urlsplit(url.strip()).hostname)
    except ValueError:
        return None  # unparsable: check_url names it


def strip_credentials(url: str) -> str:
    """The URL without `user:password@`, the rest unchanged.

    Credentials in a public URL list are someone else's secret: they are neither stored nor sent
    (aiohttp would turn them into an Authorization header, in clear text over http).
    """
    return _CREDENTIALS.sub(r"\1", url, count=1)
