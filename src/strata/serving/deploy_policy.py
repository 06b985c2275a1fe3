"""What a deploy over the API may ask for, turned into a model config under the machine's own rules.

Nothing that arrives over the API may choose a program, its arguments or environment, a file path, or
the name of an environment variable to read. So a deploy request is one of two things:

- `{"profile": "<name>"}`: a version declared under `deploy.profiles` in the configuration file, of any
  kind; the launch spec of a launched server (embedded, vLLM) is the file's, never the request's;
- an `openai` endpoint: its URLs pass the egress policy of `deploy.endpoints` (every DNS answer too, now
  and at each later connection), and its `api_key_env`, if any, is one of `deploy.api_keys`, a key that
  is only ever sent to the hosts listed with it.

The validated request is the version's *reference*: what the audit trail records and the cluster
stores; each replica resolves a reference again, against its own configuration.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from strata.config import (
    DeployConfig,
    EmbeddedModelConfig,
    ModelConfig,
    OpenAIModelConfig,
    TritonModelConfig,
    VllmModelConfig,
)
from strata.config_loader import format_path
from strata.security.egress import (
    METADATA_ADDRESSES,
    EgressPolicy,
    EgressRefused,
    EgressVerdict,
    IPAddress,
    classify_address,
    embedded_ipv4,
    parse_address,
)
from strata.security.egress_resolver import system_resolver

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# Fields of launched kinds that name what runs and how: never taken from a request.
LAUNCH_FIELDS = frozenset(VllmModelConfig.model_fields) | frozenset(EmbeddedModelConfig.model_fields)
LAUNCH_FIELDS |= frozenset(TritonModelConfig.model_fields)
LAUNCH_FIELDS -= frozenset(OpenAIModelConfig.model_fields)
LAUNCHED_KINDS = ("embedded", "vllm", "triton")
_MOST_TELLING = ("executable", "env", "extra_args", "model_path", "model")  # named first when refused
DNS_TIMEOUT_S = 5.0
_ECHO_MAX = 64


class DeployRefused(Exception):
    """The request asks for something the API may not choose (403) or is malformed (400)."""

    def __init__(self, status: int, message: str, *, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ResolvedDeploy:
    config: ModelConfig
    reference: dict[str, Any]  # the request as validated: audited, stored, re-resolved by each replica
    egress: EgressPolicy | None  # for endpoints given over the API: every DNS answer must pass it


class EndpointEgress(EgressPolicy):
    """http_fetch's rules, and stricter: link-local and cloud metadata addresses are refused even inside
    `allow_networks` (a backend never lives there; instance credentials do)."""

    def check_address(self, address: str | IPAddress, *, host: str | None = None) -> EgressVerdict:
        parsed = parse_address(address)
        if parsed is not None:
            inner = embedded_ipv4(parsed) or parsed
            if inner.is_link_local or parsed in METADATA_ADDRESSES or inner in METADATA_ADDRESSES:
                why = classify_address(parsed) or "a cloud metadata address"
                via = f"{host} resolves to " if host and parse_address(host) is None else ""
                return EgressVerdict(False, f"refused: {via}{parsed}, {why}" if via else f"refused: {parsed} is {why}")
        return super().check_address(address, host=host)


class DeployPolicy:
    def __init__(
        self,
        config: DeployConfig,
        environ: Mapping[str, str] | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._config = config
        self._environ = os.environ if environ is None else environ
        self._resolve = resolver
        rules = config.endpoints
        self.egress = EndpointEgress(
            allow_domains=rules.allow_domains, deny_domains=rules.deny_domains, allow_networks=rules.allow_networks
        )
        # Each allowed key with the hosts it may be sent to, judged like a domain allow list.
        self._keys = {grant.env: (grant.hosts, EgressPolicy(allow_domains=grant.hosts)) for grant in config.api_keys}

    async def resolve(self, name: str, body: object) -> ResolvedDeploy:
        """The model config a request (or a stored reference) stands for; raises `DeployRefused`, or
        pydantic's `ValidationError` for an openai body that is not a valid model config."""
        if not isinstance(body, dict):
            raise DeployRefused(400, 'the body must be an object: {"profile": name} or an openai endpoint', param=None)
        if "profile" in body:
            return self._profile(name, body)
        kind = body.get("kind", "openai")
        self._refuse_launch_fields(body, kind)
        self._check_key_names(body)
        config = OpenAIModelConfig.model_validate(
            {**body, "kind": "openai", "name": name}, context={"environ": self._environ}
        )
        for index, endpoint in enumerate(config.endpoints()):
            prefix = f"deployments[{index}]." if config.deployments else ""
            own_key = prefix and config.deployments[index].api_key_env
            await self._check_endpoint(endpoint.base_url, endpoint.api_key_env, prefix, prefix if own_key else "")
        settings = config.model_dump(mode="json", exclude={"name", "kind"}, exclude_defaults=True)
        return ResolvedDeploy(config, {"kind": "openai", **settings}, self.egress)

    def _profile(self, name: str, body: dict[str, Any]) -> ResolvedDeploy:
        extra = sorted(str(k) for k in body if k != "profile")
        if extra:
            raise DeployRefused(
                400,
                f"a profile deploy takes only 'profile' (its settings come from the configuration file); "
                f"unexpected: {', '.join(extra)}",
                param=extra[0],
            )
        profile = body["profile"]
        spec = self._config.profiles.get(profile) if isinstance(profile, str) else None
        if spec is None:
            known = ", ".join(sorted(self._config.profiles)) or "none are configured"
            message = f"no profile {_echo(profile)} under deploy.profiles ({known})"
            raise DeployRefused(400, message, param="profile", code="unknown_profile")
        if spec.name != name:
            raise DeployRefused(
                400, f"profile {profile!r} is a version of model {spec.name!r}, not of {name!r}", param="profile"
            )
        return ResolvedDeploy(spec, {"profile": profile}, None)

    @staticmethod
    def _refuse_launch_fields(body: dict[str, Any], kind: object) -> None:
        fields = sorted((str(f) for f in body if f in LAUNCH_FIELDS), key=_telling)
        if kind in LAUNCHED_KINDS or fields:
            named = ", ".join(repr(f) for f in fields) if fields else f"kind {kind!r}"
            raise DeployRefused(
                403,
                f"refused: {named} cannot be set over the API. A program, its arguments, its environment and "
                "file paths come only from the configuration file on the machine: declare the version under "
                'deploy.profiles and deploy it with {"profile": "<name>"}.',
                param=fields[0] if fields else "kind",
                code="config_only",
            )
        if kind != "openai":
            message = f"kind {_echo(kind)} cannot be deployed over the API: send a profile or kind 'openai'"
            raise DeployRefused(400, message, param="kind")

    def _check_key_names(self, body: dict[str, Any]) -> None:
        """Before validation, so a refused name never reaches the check of whether it is set."""
        places: list[tuple[tuple[str | int, ...], object]] = [(("api_key_env",), body.get("api_key_env"))]
        deployments = body.get("deployments")
        if isinstance(deployments, list):
            places += [
                (("deployments", i, "api_key_env"), d.get("api_key_env"))
                for i, d in enumerate(deployments)
                if isinstance(d, dict)
            ]
        for path, env in places:
            if env is not None and (not isinstance(env, str) or env not in self._keys):
                param = format_path(path)
                allowed = ", ".join(sorted(self._keys)) or "none are configured"
                raise DeployRefused(
                    403,
                    f"{param}: {_echo(env)} is not a key a deploy over the API may use; the configuration's "
                    f"deploy.api_keys allows: {allowed}",
                    param=param,
                    code="api_key_not_allowed",
                )

    async def _check_endpoint(self, base_url: str, key_env: str | None, prefix: str, key_prefix: str) -> None:
        param = f"{prefix}base_url"
        parts = urlsplit(base_url)
        if parts.username is not None or parts.password is not None:
            raise DeployRefused(400, f"{param}: credentials in the URL are not accepted; use api_key_env", param=param)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise DeployRefused(400, f"{param}: the URL's port is not valid", param=param) from None
        host = parts.hostname or ""
        try:
            self.egress.require_host(host)
            if key_env is not None:
                hosts, allowed = self._keys[key_env]
                if not allowed.check_host(host).allowed:
                    raise DeployRefused(
                        403,
                        f"{key_prefix}api_key_env: the key in {key_env} may only be sent to {', '.join(hosts)}, "
                        f"not to {host}",
                        param=f"{key_prefix}api_key_env",
                        code="api_key_not_allowed",
                    )
            addresses = [host] if parse_address(host) is not None else await self._lookup(host, port, param)
            self.egress.require_addresses(host, addresses)
        except EgressRefused as exc:
            raise DeployRefused(403, f"{param}: {exc}", param=param, code="egress_refused") from None

    async def _lookup(self, host: str, port: int, param: str) -> Sequence[str]:
        try:
            async with asyncio.timeout(DNS_TIMEOUT_S):
                return await self._resolve(host, port)
        except (OSError, TimeoutError) as exc:
            raise DeployRefused(
                400, f"{param}: cannot resolve {host}: {exc or 'timed out'}", param=param, code="unresolvable_host"
            ) from None


def _telling(field: str) -> int:
    return _MOST_TELLING.index(field) if field in _MOST_TELLING else len(_MOST_TELLING)


def _echo(value: object) -> str:
    """A caller's value quoted back, bounded."""
    text = repr(value)
    return text if len(text) <= _ECHO_MAX else text[:_ECHO_MAX] + "...'"
