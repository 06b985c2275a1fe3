"""Attacks on `POST /admin/models/{name}/deploy` with an operator's key, against a real `strata serve`.

An operator may switch models between versions the configuration file declares and point openai
models at endpoints the configuration allows, with keys it allows. Nothing sent over the API may pick
a program, its arguments or environment, a path, an environment variable to read, or a forbidden URL.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import REPO_ROOT, StrataProcess

UPSTREAM_KEY = "upstream-secret-for-the-allowed-endpoint"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Setup:
    strata: StrataProcess
    operator: httpx.Client
    operator_key_id: str
    current: MockBackend  # what "llm" serves from the config
    attacker: MockBackend  # an endpoint the attacks try to make Strata call with a secret
    allowed: MockBackend  # an endpoint an operator may legitimately deploy, with the allowed key
    workdir: Path


def fake_vllm(directory: Path) -> Path:
    script = directory / "vllm"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={REPO_ROOT} exec {sys.executable} -m tests.support.fake_vllm "$@"\n')
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("lockdown")
    with MockBackend() as current, MockBackend() as attacker, MockBackend(api_key=UPSTREAM_KEY) as allowed:
        current.default = Reply(content="version one")
        allowed.default = Reply(content="the allowed endpoint")
        config: dict[str, Any] = {
            "models": [
                {"kind": "openai", "name": "llm", "base_url": current.url},
                {"kind": "openai", "name": "gen", "base_url": current.url},
            ],
            "agents": [],
            "server": {"health_interval_s": 0.2, "drain_delay_s": 0, "shutdown_grace_s": 2},
            "deploy": {
                "profiles": {
                    "gen-vllm": {
                        "kind": "vllm",
                        "name": "gen",
                        "model": "org/gen-v2",
                        "executable": str(fake_vllm(workdir)),
                        "startup_timeout_s": 60,
                    }
                },
                "endpoints": {"allow_networks": ["127.0.0.0/8"]},
                "api_keys": [{"env": "UPSTREAM_KEY", "hosts": ["127.0.0.1"]}],
            },
        }
        strata = StrataProcess(workdir, config, env={"UPSTREAM_KEY": UPSTREAM_KEY}).start()
        try:
            created = httpx.post(
                f"{strata.url}/admin/keys", json={"name": "ops", "role": "operator"}, headers=strata.headers
            ).json()
            with strata.client(created["key"], timeout=60) as operator:
                yield Setup(strata, operator, created["id"], current, attacker, allowed, workdir)
        finally:
            strata.stop()


def deploy(setup: Setup, model: str, body: object) -> httpx.Response:
    # A short health timeout bounds the wait should a refused version be started after all.
    return setup.operator.post(f"/admin/models/{model}/deploy?health_timeout_s=2", json=body)


def llm_version(setup: Setup) -> int:
    models = setup.operator.get("/admin/models").json()["data"]
    return next(m["version"] for m in models if m["model"] == "llm")


def assert_refused(response: httpx.Response, status: int, param: str, *words: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]
    return str(error["message"])


def test_the_bash_env_attack_runs_nothing(setup: Setup) -> None:
    stolen = setup.workdir / "stolen"
    keyring = setup.workdir / "strata-data" / "encryption.keys"
    assert keyring.is_file()
    attack = {
        "kind": "vllm",
        "model": "x",
        "executable": "/bin/bash",
        "env": {"BASH_ENV": f"$(id > {stolen}; cat {keyring} >> {stolen})"},
    }
    message = assert_refused(deploy(setup, "llm", attack), 403, "executable", "'executable'", "'env'")
    assert "configuration file" in message
    assert not stolen.exists(), "the attacker's command ran"
    # The same smuggled under an openai model, or as a launched kind with a path of the caller's choosing.
    smuggled = {"kind": "openai", "base_url": setup.current.url, "env": {"BASH_ENV": f"$(id > {stolen})"}}
    assert_refused(deploy(setup, "llm", smuggled), 403, "env", "'env'")
    embedded = {"kind": "embedded", "model_path": str(keyring)}
    assert_refused(deploy(setup, "llm", embedded), 403, "model_path", "'model_path'")
    extra_args = {"profile": "gen-vllm", "extra_args": ["--evil"]}
    assert_refused(deploy(setup, "gen", extra_args), 400, "extra_args")
    assert not stolen.exists()
    assert llm_version(setup) == 1
    answer = setup.operator.post("/v1/chat/completions", json={**CHAT, "model": "llm"})
    assert answer.json()["choices"][0]["message"]["content"] == "version one"


def test_an_environment_variable_outside_the_allow_list_is_never_read(setup: Setup) -> None:
    for body, param in [
        ({"kind": "openai", "base_url": setup.attacker.url, "api_key_env": "STRATA_ADMIN_KEY"}, "api_key_env"),
        ({"base_url": setup.attacker.url, "api_key_env": "HOME"}, "api_key_env"),
        (
            {"kind": "openai", "deployments": [{"base_url": setup.attacker.url, "api_key_env": "STRATA_ADMIN_KEY"}]},
            "deployments[0].api_key_env",
        ),
    ]:
        response = deploy(setup, "llm", body)
        assert_refused(response, 403, param, "deploy.api_keys")
        assert response.json()["error"]["code"] == "api_key_not_allowed"
    # An allowed key goes only to the hosts listed with it: "localhost" is not "127.0.0.1".
    elsewhere = setup.attacker.url.replace("127.0.0.1", "localhost")
    response = deploy(setup, "llm", {"kind": "openai", "base_url": elsewhere, "api_key_env": "UPSTREAM_KEY"})
    assert_refused(response, 403, "api_key_env", "UPSTREAM_KEY", "localhost")
    assert setup.attacker.requests == [], "Strata called the attacker's endpoint"
    assert llm_version(setup) == 1


@pytest.mark.parametrize(
    ("base_url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://[fe80::1]:8000/v1", "link-local"),
        ("http://10.20.30.40:8000/v1", "private address"),
        ("http://[::ffff:169.254.169.254]/v1", "metadata"),
    ],
)
def test_forbidden_addresses_are_refused(setup: Setup, base_url: str, reason: str) -> None:
    response = deploy(setup, "llm", {"kind": "openai", "base_url": base_url})
    assert_refused(response, 403, "base_url", reason)
    assert response.json()["error"]["code"] == "egress_refused"
    assert llm_version(setup) == 1


def test_a_config_profile_and_an_allowed_endpoint_deploy(setup: Setup) -> None:
    profile = deploy(setup, "gen", {"profile": "gen-vllm"})
    assert profile.status_code == 200, profile.text
    assert profile.json()["reference"] == {"profile": "gen-vllm"}
    answer = setup.operator.post("/v1/chat/completions", json={**CHAT, "model": "gen"})
    assert answer.json()["choices"][0]["message"]["content"] == "org/gen-v2 says hi"

    before = llm_version(setup)
    endpoint = {"kind": "openai", "base_url": setup.allowed.url, "api_key_env": "UPSTREAM_KEY"}
    response = deploy(setup, "llm", endpoint)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == before + 1
    answer = setup.operator.post("/v1/chat/completions", json={**CHAT, "model": "llm"})
    assert answer.json()["choices"][0]["message"]["content"] == "the allowed endpoint"
    assert setup.allowed.chat_requests()[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_deploys_and_reloads_are_audited_with_caller_before_and_after(setup: Setup) -> None:
    target = {"kind": "openai", "base_url": setup.allowed.url, "api_key_env": "UPSTREAM_KEY"}
    deployed = deploy(setup, "gen", target)
    assert deployed.status_code == 200, deployed.text
    refused = deploy(setup, "gen", {"kind": "vllm", "executable": "/bin/sh"})
    assert refused.status_code == 403
    reloaded = setup.operator.post("/admin/reload")
    assert reloaded.status_code == 200, reloaded.text

    strata = setup.strata
    rows = httpx.get(f"{strata.url}/admin/audit", params={"limit": 1000}, headers=strata.headers).json()["data"]
    actor = f"key:{setup.operator_key_id}"
    deploys = [r for r in rows if r["action"] == "model.deployed" and r["resource"] == "model gen"]
    success = next(r for r in reversed(deploys) if r["outcome"] == "success")
    assert success["actor"] == actor and success["actor_role"] == "operator"
    assert success["details"]["after"] == {
        "version": deployed.json()["version"],
        "reference": deployed.json()["reference"],
    }
    assert success["details"]["before"]["version"] == deployed.json()["version"] - 1
    denied = next(r for r in reversed(deploys) if r["outcome"] == "denied")
    assert denied["actor"] == actor
    assert denied["details"]["refused"] == "executable" and denied["details"]["after"] is None
    assert denied["details"]["before"] == success["details"]["after"]

    reload_row = next(r for r in reversed(rows) if r["action"] == "config.reloaded")
    assert reload_row["actor"] == actor and reload_row["outcome"] == "success"
    before, after = reload_row["details"]["before"], reload_row["details"]["after"]
    # The config file serves "gen" from `current`: the reload puts the config's version back.
    assert before["gen"] == success["details"]["after"]
    assert after["gen"] == {"version": before["gen"]["version"] + 1, "reference": {"source": "config"}}
    assert "gen" in reload_row["details"]["deployed"]
