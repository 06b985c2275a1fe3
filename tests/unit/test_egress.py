"""The egress policy: which addresses and domains an agent's fetch may reach, and why not."""

from __future__ import annotations

import pytest

from strata.config import HttpFetchConfig
from strata.security.egress import EgressPolicy, EgressRefused, classify_address, parse_address

OPEN = EgressPolicy()


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("127.0.0.1", "loopback"),
        ("127.254.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private address (RFC 1918)"),
        ("172.16.0.1", "private address (RFC 1918)"),
        ("172.31.255.254", "private address (RFC 1918)"),
        ("192.168.1.1", "private address (RFC 1918)"),
        ("169.254.169.254", "link-local address (cloud metadata)"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fc00::1", "unique local IPv6 address (ULA)"),
        ("fd12:3456::1", "unique local IPv6 address (ULA)"),
        ("fd00:ec2::254", "(cloud metadata)"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.100.100.200", "(cloud metadata)"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "non-global"),  # TEST-NET-1 documentation range
        ("198.18.0.1", "non-global"),  # benchmarking range
        ("0.1.2.3", "non-global"),
        ("fec0::1", "site-local"),
        ("::127.0.0.1", "reserved IPv6"),  # deprecated IPv4-compatible form
        ("::ffff:127.0.0.1", "IPv4-mapped IPv6 address for 127.0.0.1, a loopback address"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("2002:7f00:1::", "127.0.0.1, a loopback address"),  # 6to4 wrapping loopback
        ("2002:a00:1::", "10.0.0.1, a private address"),  # 6to4 wrapping 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "169.254.169.254, a link-local address"),  # NAT64 to the metadata address
        ("2001:db8::1", "non-global"),  # documentation prefix
    ],
)
def test_non_public_addresses_are_refused_with_the_reason(address: str, fragment: str) -> None:
    verdict = OPEN.check_address(address)
    assert not verdict.allowed
    assert verdict.reason.startswith("refused: ")
    assert fragment in verdict.reason


def test_metadata_reason_reads_plainly() -> None:
    assert OPEN.check_address("169.254.169.254").reason == (
        "refused: 169.254.169.254 is a link-local address (cloud metadata)"
    )


def test_reason_names_the_host_that_resolved_to_a_blocked_address() -> None:
    verdict = OPEN.check_address("10.0.0.5", host="intranet.example")
    assert verdict.reason == "refused: intranet.example resolves to 10.0.0.5, a private address (RFC 1918)"


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    verdict = OPEN.check_address(address)
    assert verdict.allowed, verdict.reason
    assert "public" in verdict.reason


def test_allow_networks_exempts_only_the_listed_ranges() -> None:
    policy = EgressPolicy(allow_networks=["127.0.0.1/32", "10.20.0.0/16", "fd00:1::/32"])
    assert policy.check_address("127.0.0.1").allowed
    assert policy.check_address("::ffff:127.0.0.1").allowed  # the very same IPv4 host
    assert policy.check_address("10.20.3.4").allowed
    assert policy.check_address("fd00:1::5").allowed
    assert "allow_networks 10.20.0.0/16" in policy.check_address("10.20.3.4").reason
    for blocked in ("127.0.0.2", "::1", "10.21.0.1", "169.254.169.254", "fd00:2::1"):
        assert not policy.check_address(blocked).allowed, blocked


def test_invalid_cidr_in_allow_networks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a valid CIDR"):
        EgressPolicy(allow_networks=["10.0.0.0/33"])


def test_not_an_address_is_refused() -> None:
    assert not OPEN.check_address("not-an-ip").allowed


def test_deny_list_covers_the_domain_and_its_subdomains_only() -> None:
    policy = EgressPolicy(deny_domains=["Evil.Test."])
    assert not policy.check_host("evil.test").allowed
    assert not policy.check_host("API.evil.test").allowed
    assert not policy.check_host("a.b.evil.test.").allowed
    assert "deny list (evil.test)" in policy.check_host("api.evil.test").reason
    assert policy.check_host("notevil.test").allowed
    assert policy.check_host("evil.test.example").allowed


def test_allow_list_admits_only_its_domains_and_subdomains() -> None:
    policy = EgressPolicy(allow_domains=["good.test", "*.docs.example"])
    assert policy.check_host("good.test").allowed
    assert policy.check_host("api.good.test").allowed
    assert policy.check_host("www.docs.example").allowed
    for host in ("notgood.test", "good.test.evil", "other.test", "8.8.8.8"):
        verdict = policy.check_host(host)
        assert not verdict.allowed, host
        assert "not on the domain allow list" in verdict.reason


def test_deny_beats_allow() -> None:
    policy = EgressPolicy(allow_domains=["example.com"], deny_domains=["admin.example.com"])
    assert policy.check_host("www.example.com").allowed
    assert not policy.check_host("admin.example.com").allowed


def test_empty_lists_allow_any_name() -> None:
    assert OPEN.check_host("anything.example").allowed


def test_ip_literals_match_list_entries_exactly() -> None:
    policy = EgressPolicy(deny_domains=["1.2.3.4"])
    assert not policy.check_host("1.2.3.4").allowed
    assert policy.check_host("11.2.3.4").allowed


def test_require_addresses_refuses_if_any_address_is_blocked() -> None:
    with pytest.raises(EgressRefused, match=r"10\.0\.0\.1, a private address"):
        OPEN.require_addresses("mixed.example", ["93.184.216.34", "10.0.0.1"])
    with pytest.raises(EgressRefused, match="no addresses"):
        OPEN.require_addresses("empty.example", [])
    OPEN.require_addresses("public.example", ["93.184.216.34", "2606:4700:4700::1111"])


def test_from_config_uses_every_list() -> None:
    config = HttpFetchConfig(allow_domains=["good.test"], deny_domains=["bad.good.test"], allow_networks=["10.0.0.0/8"])
    policy = EgressPolicy.from_config(config)
    assert policy.check_host("x.good.test").allowed
    assert not policy.check_host("bad.good.test").allowed
    assert policy.check_address("10.9.9.9").allowed


def test_parse_address_accepts_brackets_and_rejects_names() -> None:
    assert str(parse_address("[::1]")) == "::1"
    assert parse_address("localhost") is None
    assert classify_address(parse_address("8.8.8.8")) is None  # type: ignore[arg-type]
