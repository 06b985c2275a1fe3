"""Egress policy: which hosts and addresses a tool may reach on the network.

Agents choose URLs from untrusted text, so every outbound fetch is judged here first. Addresses are
refused unless they are public (globally routable) or inside an operator's `allow_networks`; names
are judged against the domain allow and deny lists. Callers must check every address a name
resolves to, then connect only to those addresses (see `strata.agents.tools.http_fetch`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strata.config import HttpFetchConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Addresses that answer with instance credentials on common clouds (AWS, GCP, Azure, Alibaba, AWS IPv6).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254"))

_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_ULA = ipaddress.IPv6Network("fc00::/7")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")


@dataclass(frozen=True)
class EgressVerdict:
    """The outcome of one check; `reason` is written for the person or model that asked."""

    allowed: bool
    reason: str


class EgressRefused(Exception):
    """Raised by the `require_*` helpers; carries the refusing verdict."""

    def __init__(self, verdict: EgressVerdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


def parse_address(value: str | IPAddress) -> IPAddress | None:
    """An IP address from a literal (brackets and IPv6 zone allowed), or None for a name."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    text = value.strip().removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to (mapped, 6to4, NAT64), since that is what gets reached."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def classify_address(address: IPAddress) -> str | None:
    """Why `address` is not a public destination ("a loopback address", ...), or None if it is."""
    inner = embedded_ipv4(address)
    if inner is not None:
        why = classify_address(inner)
        if why is not None:
            kind = "an IPv4-mapped IPv6 address" if address.ipv4_mapped is not None else "an IPv6 address"
            return f"{kind} for {inner}, {why}"
        if address.ipv4_mapped is not None or address in _NAT64:
            return None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        suffix = " (cloud metadata)" if address in METADATA_ADDRESSES else ""
        return "a link-local address" + suffix
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address):
        if any(address in net for net in _RFC1918):
            return "a private address (RFC 1918)"
        if address in _CGNAT:
            suffix = " (cloud metadata)" if address in METADATA_ADDRESSES else ""
            return "a shared carrier-grade NAT address (100.64.0.0/10)" + suffix
        if address.is_reserved or address == ipaddress.IPv4Address("255.255.255.255"):
            return "a reserved address"
    else:
        if address in _ULA:
            suffix = " (cloud metadata)" if address in METADATA_ADDRESSES else ""
            return "a unique local IPv6 address (ULA)" + suffix
        if address.is_site_local:
            return "a site-local IPv6 address"
        if address not in _GLOBAL_UNICAST_V6:
            return "a reserved IPv6 address"
    if not address.is_global:
        return "a special-purpose, non-global address"
    return None


def normalize_domain(name: str) -> str:
    """Lower case, no trailing dot, IDNA (punycode) form, so lists and URLs compare alike."""
    text = name.strip().lower().rstrip(".").removeprefix("*.").removeprefix(".")
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        return text


def _matches(host: str, domain: str, *, is_address: bool) -> bool:
    if host == domain:
        return True
    return not is_address and host.endswith("." + domain)


class EgressPolicy:
    """Judges hosts and addresses. Build once from config; it is immutable and safe to share."""

    def __init__(
        self,
        *,
        allow_domains: Iterable[str] = (),
        deny_domains: Iterable[str] = (),
        allow_networks: Iterable[str] = (),
    ) -> None:
        self.allow_domains = tuple(d for d in map(normalize_domain, allow_domains) if d)
        self.deny_domains = tuple(d for d in map(normalize_domain, deny_domains) if d)
        networks: list[IPNetwork] = []
        for cidr in allow_networks:
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"allow_networks: {cidr!r} is not a valid CIDR ({exc})") from exc
        self.allow_networks = tuple(networks)

    @classmethod
    def from_config(cls, config: HttpFetchConfig) -> EgressPolicy:
        return cls(
            allow_domains=config.allow_domains,
            deny_domains=config.deny_domains,
            allow_networks=config.allow_networks,
        )

    def check_host(self, host: str) -> EgressVerdict:
        """Judge the host named in a URL against the domain lists (addresses are judged separately)."""
        literal = parse_address(host)
        name = str(literal) if literal is not None else normalize_domain(host)
        if not name:
            return EgressVerdict(False, "refused: the URL has no host")
        is_address = literal is not None
        for domain in self.deny_domains:
            if _matches(name, domain, is_address=is_address):
                return EgressVerdict(False, f"refused: {name} is on the deny list ({domain})")
        if self.allow_domains and not any(_matches(name, d, is_address=is_address) for d in self.allow_domains):
            return EgressVerdict(False, f"refused: {name} is not on the domain allow list")
        return EgressVerdict(True, f"allowed: {name} passes the domain lists")

    def check_address(self, address: str | IPAddress, *, host: str | None = None) -> EgressVerdict:
        """Judge one address; `host` (the name it was resolved from) only makes the reason clearer."""
        parsed = parse_address(address)
        if parsed is None:
            return EgressVerdict(False, f"refused: {address!r} is not an IP address")
        via = f"{host} resolves to " if host and parse_address(host) is None else ""
        for candidate in (parsed, parsed.ipv4_mapped if isinstance(parsed, ipaddress.IPv6Address) else None):
            if candidate is None:
                continue
            for network in self.allow_networks:
                if candidate.version == network.version and candidate in network:
                    return EgressVerdict(True, f"allowed: {via}{parsed}, in allow_networks {network}")
        why = classify_address(parsed)
        if why is not None:
            return EgressVerdict(False, f"refused: {via}{parsed}, {why}" if via else f"refused: {parsed} is {why}")
        return EgressVerdict(True, f"allowed: {via}{parsed}, a public address")

    def require_host(self, host: str) -> None:
        verdict = self.check_host(host)
        if not verdict.allowed:
            raise EgressRefused(verdict)

    def require_addresses(self, host: str, addresses: Iterable[str | IPAddress]) -> None:
        """Refuse unless there is at least one address and every one of them is allowed."""
        seen = False
        for address in addresses:
            seen = True
            verdict = self.check_address(address, host=host)
            if not verdict.allowed:
                raise EgressRefused(verdict)
        if not seen:
            raise EgressRefused(EgressVerdict(False, f"refused: {host} resolved to no addresses"))
