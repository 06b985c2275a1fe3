"""TLS: `strata serve --tls-cert/--tls-key` (or server.tls_cert_file/tls_key_file) serves HTTPS that the official
`openai` client can use when it trusts the certificate, refuses plain HTTP and untrusting clients, and a half
TLS configuration is refused before anything starts."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import REPO_ROOT, StrataProcess


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


def self_signed(directory: Path, name: str = "strata-test") -> Certificate:
    """A self-signed certificate (its own CA) for 127.0.0.1 and localhost, and its private key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = Certificate(directory / f"{name}.crt", directory / f"{name}.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths.key.chmod(0o600)
    return paths


def config(mock: MockBackend) -> dict[str, object]:
    return {"models": [mock_model(mock)], "server": {"drain_delay_s": 0, "shutdown_grace_s": 5}}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_server(
    mock_backend: MockBackend, certificate: Certificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StrataProcess]:
    """HTTPS through the command line flags."""
    process = StrataProcess(
        tmp_path_factory.mktemp("https-cli"),
        config(mock_backend),
        {"MOCK_API_KEY": "mock-secret"},
        args=["--tls-cert", str(certificate.cert), "--tls-key", str(certificate.key)],
        ca_file=certificate.cert,
    ).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


def trusting(certificate: Certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate.cert))


def chat_over_https(server: StrataProcess, certificate: Certificate, mock: MockBackend) -> None:
    mock.script(Reply(content="Hello over TLS."))
    with httpx.Client(verify=trusting(certificate)) as http_client:
        client = openai.OpenAI(
            base_url=f"https://127.0.0.1:{server.port}/v1",
            api_key=server.api_key,
            http_client=http_client,
            max_retries=0,
        )
        result = client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "Hi"}])
    assert result.choices[0].message.content == "Hello over TLS."
    assert mock.chat_requests()[-1].body["messages"] == [{"role": "user", "content": "Hi"}]


def test_openai_client_chats_over_https_when_it_trusts_the_certificate(
    https_server: StrataProcess, certificate: Certificate, mock_backend: MockBackend
) -> None:
    chat_over_https(https_server, certificate, mock_backend)


def test_streaming_works_over_https(
    https_server: StrataProcess, certificate: Certificate, mock_backend: MockBackend
) -> None:
    mock_backend.script(Reply(content="one two three"))
    with httpx.Client(verify=trusting(certificate)) as http_client:
        client = openai.OpenAI(
            base_url=https_server.base_url, api_key=https_server.api_key, http_client=http_client, max_retries=0
        )
        stream = client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "count"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "one two three"


def test_the_console_session_cookie_is_secure_under_tls(https_server: StrataProcess) -> None:
    response = httpx.post(https_server.url + "/console/login", json={"key": https_server.api_key},
                          verify=https_server.verify, timeout=10)  # fmt: skip
    assert response.status_code == 200
    session = next(c for c in response.headers.get_list("set-cookie") if c.startswith("strata_session="))
    assert {"secure", "httponly", "samesite=strict"} <= {part.strip().lower() for part in session.split(";")}


def test_plain_http_to_the_tls_port_gets_no_answer(https_server: StrataProcess) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{https_server.port}/healthz", headers=https_server.headers, timeout=5)
    # ...and the server is none the worse for it.
    assert httpx.get(https_server.url + "/healthz", verify=https_server.verify, timeout=5).status_code == 200


def test_a_client_that_does_not_trust_the_certificate_is_refused(https_server: StrataProcess) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https_server.url + "/healthz", timeout=5)  # the system trust store only

    client = openai.OpenAI(base_url=https_server.base_url, api_key=https_server.api_key, max_retries=0)
    with pytest.raises(openai.APIConnectionError) as caught:
        client.models.list()
    causes = []
    error: BaseException | None = caught.value
    while error is not None:
        causes.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes), causes


def test_a_certificate_for_another_host_is_refused(https_server: StrataProcess, tmp_path: Path) -> None:
    """Trusting some other self-signed certificate is not trusting this server's."""
    other = self_signed(tmp_path, "someone-else")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https_server.url + "/healthz", verify=trusting(other), timeout=5)


def test_tls_from_the_config_file(mock_backend: MockBackend, certificate: Certificate, tmp_path: Path) -> None:
    """server.tls_cert_file/tls_key_file, with no command line flags, serve HTTPS too."""
    server_config = config(mock_backend)
    server_config["server"] = {
        **server_config["server"],  # type: ignore[dict-item]
        "tls_cert_file": str(certificate.cert),
        "tls_key_file": str(certificate.key),
    }
    server = StrataProcess(tmp_path, server_config, {"MOCK_API_KEY": "mock-secret"}, ca_file=certificate.cert).start()
    try:
        chat_over_https(server, certificate, mock_backend)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    finally:
        assert server.stop() == 0


def strata_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "strata", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_config_check_refuses_a_certificate_without_its_key(certificate: Certificate, tmp_path: Path) -> None:
    path = tmp_path / "strata.yaml"
    path.write_text(yaml.safe_dump({"server": {"tls_cert_file": str(certificate.cert)}}))
    result = strata_cli("config", "check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tls_key_file" in result.stderr
    assert "invalid configuration" in result.stderr

    path.write_text(yaml.safe_dump({"server": {"tls_key_file": str(certificate.key)}}))
    result = strata_cli("config", "check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "tls_cert_file" in result.stderr

    path.write_text(
        yaml.safe_dump({"server": {"tls_cert_file": str(certificate.cert), "tls_key_file": str(certificate.key)}})
    )
    result = strata_cli("config", "check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_serve_refuses_half_a_tls_pair_or_a_missing_file(certificate: Certificate, tmp_path: Path) -> None:
    path = tmp_path / "strata.yaml"
    path.write_text(yaml.safe_dump({"models": [{"kind": "openai", "name": "m", "base_url": "http://127.0.0.1:9/v1"}]}))
    result = strata_cli("serve", "--config", str(path), "--tls-cert", str(certificate.cert), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tls_key_file" in result.stderr and "cannot start" in result.stderr

    missing = tmp_path / "nowhere.key"
    result = strata_cli(
        "serve", "--config", str(path), "--tls-cert", str(certificate.cert), "--tls-key", str(missing), cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(missing) in result.stderr and "does not exist" in result.stderr
