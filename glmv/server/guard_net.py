"""Client addresses of the HTTP server: trusted-proxy resolution of X-Forwarded-For and the IP allowlist.

`X-Forwarded-For` is read only when the direct peer is one of the trusted proxies. The list is
then walked from the right (the hop the trusted proxy itself appended) towards the left, skipping
further trusted proxies; the first untrusted hop is the client. Entries to the left of it were
written by the client and are never believed. IPv4-mapped IPv6 peers (`::ffff:10.0.0.1`) are
treated as their IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from glmv.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str], *, param: str) -> tuple[IPNetwork, ...]:
    """CIDRs (or single addresses) to networks; host bits are allowed (`10.1.2.3/8` → `10.0.0.0/8`)."""
    nets: list[IPNetwork] = []
    for raw in cidrs:
        text = raw.strip()
        if not text:
            continue
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise ConfigError(f"{param}: {raw!r} is not an IP address or CIDR", param=param) from exc
        nets.append(net)
    return tuple(nets)


def parse_ip(text: str | None) -> IPAddress | None:
    """An address from a peer or forwarded-for entry (`1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `::1`)."""
    if not text:
        return None
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _within(ip: IPAddress, nets: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


class ClientAddressResolver:
    """Finds the client address of a request from its peer and, behind trusted proxies, X-Forwarded-For."""

    __slots__ = ("trusted",)

    def __init__(self, trusted_proxies: Sequence[IPNetwork]) -> None:
        self.trusted = tuple(trusted_proxies)

    def resolve(self, peer: str | None, forwarded_for: Sequence[str]) -> IPAddress | None:
        peer_ip = parse_ip(peer)
        if peer_ip is None or not self.trusted or not _within(peer_ip, self.trusted):
            return peer_ip
        hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
        client = peer_ip
        for hop in reversed(hops):
            ip = parse_ip(hop)
            if ip is None:  # garbage: keep the last address a trusted proxy vouched for
                break
            client = ip
            if not _within(ip, self.trusted):
                break
        return client


class IpAllowlist:
    """The networks allowed to use the server; an empty list allows everyone."""

    __slots__ = ("networks",)

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks = tuple(networks)

    @property
    def enabled(self) -> bool:
        return bool(self.networks)

    def allows(self, ip: IPAddress | None) -> bool:
        if not self.networks:
            return True
        return ip is not None and _within(ip, self.networks)
