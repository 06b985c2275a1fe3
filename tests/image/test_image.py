"""The OCI image, built here and smoke-tested: it runs Strata as an unprivileged user with the embedded model,
declares its health check on /healthz, and answers a chat completion.

`podman run` cannot start containers on this kind of machine (crun: setrlimit RLIMIT_NPROC: Operation not
permitted), so the test does what the runtime would: it exports the image's filesystem and starts the image's
entrypoint in it, in private mount and PID namespaces, chrooted, as the image's user. The image is rebuilt only
when what goes into it changes (its tag carries a hash of those files).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from strata.serving.supervisor import free_port
from tests.support.strata_process import REPO_ROOT

# The first build on a fresh machine makes the Debian base with mmdebstrap and every wheel: minutes, on busy
# cores, inside the first test's set-up (later builds take seconds from the caches).
pytestmark = [pytest.mark.image, pytest.mark.timeout(1200)]

NEEDS = ("podman", "mmdebstrap", "unshare", "chroot")
missing = [tool for tool in NEEDS if shutil.which(tool) is None]
if missing or os.geteuid() != 0:
    pytest.skip(
        f"the image test needs root and {', '.join(NEEDS)} (missing: {', '.join(missing) or 'root'}); "
        "`make test` installs podman and mmdebstrap when run as root",
        allow_module_level=True,
    )

ADMIN_KEY = "image-smoke-test-admin-key-0123456789"
WHEELHOUSE = Path.home() / ".cache" / "strata-wheels" / "llama-cpp-0.3.36-avx2"


def content_hash() -> str:
    """What goes into the image: the package's sources and metadata, and the image's own files."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for root in ("src", "deploy/image")
        for p in (REPO_ROOT / root).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
    )
    for path in [*files, REPO_ROOT / "pyproject.toml", REPO_ROOT / "README.md"]:
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def image() -> str:
    tag = f"localhost/strata:test-{content_hash()}"
    if subprocess.run(["podman", "image", "exists", tag]).returncode != 0:
        env = os.environ | {"IMAGE": tag, "WHEELHOUSE": str(WHEELHOUSE), "PYTHON": sys.executable}
        build = subprocess.run([str(REPO_ROOT / "deploy" / "image" / "build.sh")], env=env, capture_output=True,
                               text=True, timeout=900)  # fmt: skip
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        listed = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                                text=True).stdout.split()  # fmt: skip
        stale = [name for name in listed if name.startswith("localhost/strata:test-") and name != tag]
        if stale:  # one image of a gigabyte per source change would fill the disk
            subprocess.run(["podman", "rmi", "--force", *stale], capture_output=True)
    return tag


@pytest.fixture(scope="module")
def rootfs(image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs")
    container = subprocess.run(["podman", "create", image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        exported = root.parent / "image.tar"
        subprocess.run(["podman", "export", "-o", str(exported), container], check=True, capture_output=True)
        with tarfile.open(exported) as tar:
            tar.extractall(root, filter="tar")  # keeps owners and modes, refuses links out of the tree
        exported.unlink()
        root.chmod(0o755)  # the image's / (pytest made the folder 0700: its user could not even look in)
    finally:
        subprocess.run(["podman", "rm", "-f", container], capture_output=True)
    return root


def config_of(image: str) -> dict[str, object]:
    result = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True)
    return orjson.loads(result.stdout)[0]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(image: str, rootfs: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    config = config_of(image)["Config"]
    user = str(config["User"])  # type: ignore[index]
    env = [f"{name}" for name in config["Env"]]  # type: ignore[index]
    port = free_port()
    env += [f"STRATA_ADMIN_KEY={ADMIN_KEY}", f"STRATA_SERVER__PORT={port}", "HOME=/var/lib/strata"]
    entrypoint = [*config["Entrypoint"], *config["Cmd"]]  # type: ignore[index]
    workdir = str(config["WorkingDir"])  # type: ignore[index]
    # What a runtime does: a fresh /proc and /dev in private namespaces, the image's user, env and entrypoint.
    script = (
        f'mount -t proc proc "$ROOT/proc" && mount --rbind /dev "$ROOT/dev" && mount -t tmpfs tmpfs "$ROOT/tmp" '
        f'&& exec chroot --userspec={user} "$ROOT" /usr/bin/env -i {" ".join(env)} '
        f'/bin/sh -c "cd {workdir} && exec \\"\\$@\\"" strata {" ".join(entrypoint)}'
    )
    process = subprocess.Popen(
        ["unshare", "--mount", "--pid", "--fork", "--kill-child", "/bin/sh", "-c", script],
        env={"ROOT": str(rootfs), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    yield process, port
    # The server is PID 1 of its namespace, under another uid: the parent-death signal unshare arranges does not
    # survive the change of user, so stop the server itself (its namespace, and unshare, end with it).
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _listens(proc, port):
            os.kill(int(proc.name), signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_the_image_runs_strata_unprivileged_with_the_embedded_model(
    image: str, rootfs: Path, server: tuple[subprocess.Popen[bytes], int]
) -> None:
    process, port = server
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    ready = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            ready = httpx.get(f"{base}/readyz", timeout=2)
            if ready.status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    if ready is None or ready.status_code != 200:
        output = process.stdout.read().decode(errors="replace") if process.poll() is not None and process.stdout else ""
        pytest.fail(f"Strata in the image never became ready: {ready and ready.status_code} {output[-3000:]}")
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200

    # The server runs as the image's unprivileged user, seen from outside the namespaces.
    servers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _listens(p, port)]
    assert servers, "no process found listening on the port"
    uid = next(line.split()[1] for line in (servers[0] / "status").read_text().splitlines() if line.startswith("Uid:"))
    assert uid == "10001" == str(config_of(image)["Config"]["User"]).split(":")[0]  # type: ignore[index]

    # The image's own health check command, run in the image against this server's port, passes.
    check = [part.replace(":8000/", f":{port}/") for part in config_of(image)["Healthcheck"]["Test"][1:]]  # type: ignore[index]
    probe = subprocess.run(["chroot", "--userspec=10001:10001", str(rootfs), "/usr/bin/env", "PATH=/opt/strata/bin:/usr/bin", *check],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert probe.returncode == 0, probe.stderr

    answer = httpx.post(
        f"{base}/v1/chat/completions",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["choices"][0]["message"]["content"] and 0 < body["usage"]["completion_tokens"] <= 8


def test_the_image_declares_its_health_check_user_port_and_volume(image: str) -> None:
    inspected = config_of(image)
    check = inspected["Healthcheck"]["Test"]  # type: ignore[index]
    assert check[0] == "CMD" and "http://127.0.0.1:8000/healthz" in " ".join(check)
    config = inspected["Config"]
    assert config["User"] == "10001:10001"  # type: ignore[index]
    assert "8000/tcp" in config["ExposedPorts"]  # type: ignore[index]
    assert "/var/lib/strata" in config["Volumes"]  # type: ignore[index]
    assert config["Entrypoint"] == ["strata"] and config["Cmd"] == ["serve"]  # type: ignore[index]


def _listens(proc: Path, port: int) -> bool:
    from tests.support.strata_process import listens_on

    try:
        return "strata" in (proc / "cmdline").read_bytes().decode(errors="replace") and listens_on(int(proc.name), port)
    except OSError:
        return False
