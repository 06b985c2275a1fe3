#!/bin/bash
# Build Strata's image with podman: `make image` (IMAGE=strata:0.1.0 by default).
# With BASE unset and no registry needed, the base is Debian bookworm built here by mmdebstrap, once, and cached
# under ~/.cache/strata-image; `BASE=docker.io/library/python:3.11-slim-bookworm make image` uses a registry's.
# Every Python package goes into the image as a wheel made here first (pip's cache makes that quick): the build
# itself needs no network, and the llama-cpp-python wheel comes from the wheelhouse `make bootstrap` filled
# (WHEELHOUSE), so llama.cpp is never compiled again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=${IMAGE:-strata:0.1.0}
wheelhouse=${WHEELHOUSE:?WHEELHOUSE: the folder holding the llama-cpp-python wheel (the Makefile sets it)}
python=${PYTHON:-python3}  # a Python 3.11, like the image's, to make the wheels with
cache=${STRATA_IMAGE_CACHE:-$HOME/.cache/strata-image}
base=${BASE:-}

ls "$wheelhouse"/llama_cpp_python-*.whl >/dev/null 2>&1 || { echo "no llama-cpp-python wheel in $wheelhouse: run make bootstrap first"; exit 2; }
if [ -z "$base" ]; then
    base=localhost/strata-base:bookworm
    if ! podman image exists "$base"; then
        mkdir -p "$cache"
        if [ ! -f "$cache/base.tar" ] || [ ! -s "$cache/base.tar" ]; then
            echo "==> base: Debian bookworm (mmdebstrap, once; cached in $cache)"
            rm -rf "$cache/base.tar" "$cache/base.tar.part"  # what a failed or older build left
            # --format: mmdebstrap picks the format from the file's suffix, and `.part` means "a directory".
            mmdebstrap --variant=minbase --format=tar --include=python3,python3-venv,ca-certificates,libgomp1 \
                bookworm "$cache/base.tar.part"
            mv "$cache/base.tar.part" "$cache/base.tar"
        fi
        echo "==> base: podman import"
        podman import "$cache/base.tar" "$base" >/dev/null
    fi
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/wheels" "$context/deploy"
cp -r "$repo/src" "$repo/pyproject.toml" "$repo/README.md" "$context/"
cp -r "$repo/deploy/image" "$context/deploy/"
find "$context/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
echo "==> wheels of Strata and its dependencies"
"$python" -m pip wheel --quiet --wheel-dir "$context/wheels" --find-links "$wheelhouse" "$context[embedded]"
echo "==> podman build $image (FROM $base)"
# --isolation chroot: builds where podman cannot start an OCI runtime (no RLIMIT_NPROC in some sandboxes).
podman build --isolation chroot --format docker --build-arg "BASE=$base" \
    -f "$context/deploy/image/Containerfile" -t "$image" "$context"
echo "==> built $image"
