"""What a deploy over the API resolves to: DNS answers are judged at deploy time and again at every
connection, link-local and metadata addresses are refused even where a network is allowed."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from strata.config import DeployConfig, TimeoutsConfig
from strata.security.egress_resolver import EgressResolver
from strata.serving.client import OpenAIClient
from strata.serving.deploy_policy import DeployPolicy, DeployRefused
from tests.support.mock_backend import MockBackend


def answering(*addresses: str):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> Sequence[str]:
        return list(addresses)

    return resolve


def policy(resolver=None, **deploy: object) -> DeployPolicy:  # type: ignore[no-untyped-def]
    config = DeployConfig.model_validate(deploy)
    return DeployPolicy(config, {"GPU_KEY": "k"}, resolver=resolver or answering("93.184.215.14"))


async def refused(p: DeployPolicy, body: dict[str, object]) -> DeployRefused:
    with pytest.raises(DeployRefused) as caught:
        await p.resolve("llm", body)
    return caught.value


async def test_a_name_is_judged_by_every_address_it_resolves_to() -> None:
    p = policy(answering("8.8.8.8", "10.0.0.7"), endpoints={"allow_domains": ["gpu.example.com"]})
    error = await refused(p, {"kind": "openai", "base_url": "http://gpu.example.com/v1"})
    assert (error.status, error.param) == (403, "base_url")
    assert "gpu.example.com resolves to 10.0.0.7" in error.message
    allowed = policy(answering("10.0.0.7"), endpoints={"allow_networks": ["10.0.0.0/24"]})
    resolved = await allowed.resolve("llm", {"kind": "openai", "base_url": "http://gpu.example.com/v1"})
    assert resolved.egress is allowed.egress
    assert resolved.reference == {"kind": "openai", "base_url": "http://gpu.example.com/v1"}


async def test_link_local_and_metadata_stay_refused_inside_an_allowed_network() -> None:
    p = policy(endpoints={"allow_networks": ["169.254.0.0/16", "100.64.0.0/10", "fd00::/8"]})
    for url in ("http://169.254.169.254/v1", "http://100.100.100.200/v1", "http://[fd00:ec2::254]/v1"):
        error = await refused(p, {"kind": "openai", "base_url": url})
        assert error.code == "egress_refused" and "metadata" in error.message, error.message
    rebound = policy(answering("169.254.169.254"), endpoints={"allow_networks": ["169.254.0.0/16"]})
    error = await refused(rebound, {"kind": "openai", "base_url": "http://innocent.example.com/v1"})
    assert "innocent.example.com resolves to 169.254.169.254" in error.message


async def test_a_key_is_bound_to_its_hosts_and_a_profile_to_its_model() -> None:
    p = policy(api_keys=[{"env": "GPU_KEY", "hosts": ["gpu.example.com"]}])
    ok = await p.resolve(
        "llm", {"kind": "openai", "base_url": "https://a.gpu.example.com/v1", "api_key_env": "GPU_KEY"}
    )
    assert ok.config.endpoints()[0].api_key_env == "GPU_KEY"
    error = await refused(p, {"kind": "openai", "base_url": "https://other.example.com/v1", "api_key_env": "GPU_KEY"})
    assert (error.status, error.param) == (403, "api_key_env")
    unset = await refused(p, {"kind": "openai", "base_url": "https://gpu.example.com/v1", "api_key_env": "PATH"})
    assert unset.code == "api_key_not_allowed"
    userinfo = await refused(p, {"kind": "openai", "base_url": "https://u:secret@gpu.example.com/v1"})
    assert userinfo.status == 400 and "secret" not in userinfo.message
    with pytest.raises(ValueError, match="Strata's own"):
        DeployConfig.model_validate({"api_keys": [{"env": "STRATA_ADMIN_KEY", "hosts": ["x"]}]})
    profiles = policy(profiles={"v2": {"kind": "openai", "name": "other", "base_url": "http://10.0.0.1/v1"}})
    wrong = await refused(profiles, {"profile": "v2"})
    assert wrong.param == "profile" and "'other'" in wrong.message


async def test_the_client_checks_dns_again_when_it_connects() -> None:
    """What was public at deploy time may resolve to loopback later (rebinding): the connection is refused."""
    with MockBackend() as mock:
        url = mock.url.replace("127.0.0.1", "localhost")
        strict = DeployPolicy(DeployConfig()).egress
        lenient = DeployPolicy(
            DeployConfig.model_validate({"endpoints": {"allow_networks": ["127.0.0.0/8", "::1/128"]}})
        )
        results = []
        for egress in (strict, lenient.egress):
            client = OpenAIClient("t", url, api_key=None, timeouts=TimeoutsConfig(), max_connections=4,
                                  resolver=EgressResolver(egress))  # fmt: skip
            await client.start()
            try:
                results.append(await client.probe(timeout_s=5))
            finally:
                await client.close()
        assert results == [False, True]
        assert len(mock.requests) == 1
