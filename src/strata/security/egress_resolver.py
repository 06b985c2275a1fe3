"""DNS for connections the egress policy governs: every answer is judged before aiohttp connects.

Checking a name once and connecting later leaves a gap a DNS answer can change in (rebinding); a
resolver that judges each answer it hands to the connector closes it. TLS still verifies the name.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult

from strata.security.egress import EgressPolicy, EgressRefused, parse_address


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the event loop's getaddrinfo (a worker thread, never blocking the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def resolve_results(host: str, port: int, family: int, addresses: Sequence[str]) -> list[ResolveResult]:
    """aiohttp's view of checked addresses, keeping those of the requested family."""
    results: list[ResolveResult] = []
    for address in addresses:
        ip = parse_address(address)
        if ip is None:
            continue
        af = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        if family in (socket.AF_UNSPEC, af):
            results.append(
                ResolveResult(hostname=host, host=address, port=port, family=af, proto=0, flags=socket.AI_NUMERICHOST)
            )
    if not results:
        raise OSError(f"{host} has no checked address of the requested family")
    return results


class EgressResolver(AbstractResolver):
    """Resolves through the system and refuses (OSError, so the connection fails) any answer with an
    address the policy refuses. Pair it with no redirects: aiohttp never resolves an address literal."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        try:
            self._policy.require_host(host)
            addresses = await system_resolver(host, port)
            self._policy.require_addresses(host, addresses)
        except EgressRefused as exc:
            raise OSError(str(exc)) from None
        return resolve_results(host, port, family, addresses)

    async def close(self) -> None:
        return None
