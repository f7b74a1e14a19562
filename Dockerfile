# One image with every entry point of pyproject's [project.scripts]: ambient-control, ambient-cni-agent,
# ambient-cni (the CNI plugin), ztunnel, waypoint, ambientctl; plus the plugin as a self-contained bundle
# in /opt/ambient/cni-plugin, which the agent installs on each host.
#   docker build -t ambient-py:0.1.0 . && kind load docker-image ambient-py:0.1.0

# -- cni-plugin: the istio-cni plugin that runs on hosts, which have no /opt/venv ---------------------------
# A PyInstaller onedir bundle (cni/plugin_bundle.py). It carries libpython and OpenSSL but uses the host's
# glibc, so it is built on Debian bullseye (glibc 2.31): it then runs on hosts with glibc 2.31 or newer.
FROM python:3.11-slim-bullseye AS cni-plugin
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/* \
 && python -m pip install "pyinstaller>=6.0,<7" "PyYAML>=6.0"
WORKDIR /src
COPY ambient ./ambient
COPY cni ./cni
RUN python -m cni.plugin_bundle /opt/cni-plugin \
 && test -x /opt/cni-plugin/istio-cni \
 && CNI_COMMAND=VERSION /opt/cni-plugin/istio-cni </dev/null

# -- builder: a venv with the project and its dependencies (wheels only, no compiler needed) --------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ambient ./ambient
COPY ztunnel ./ztunnel
COPY waypoint ./waypoint
COPY cni ./cni
COPY samples ./samples
RUN /opt/venv/bin/pip install --no-compile . \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
 && test -x /opt/venv/bin/ambient-cni

# -- final: the venv plus the tools the node agent drives -------------------------------------------
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables ipset iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
# The agent's default --plugin-source (cni/agent_config.py PLUGIN_BUNDLE): it installs this directory into the
# node's CNI bin dir as istio-cni.d/<content hash>/ behind the link `istio-cni`.
COPY --from=cni-plugin /opt/cni-plugin /opt/ambient/cni-plugin
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
# Istio's proxy uid. ambient-control runs as this user; ztunnel and the CNI agent set runAsUser: 0 in
# their DaemonSets because they enter pod network namespaces and program netfilter.
RUN groupadd --gid 1337 ambient && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin ambient
USER 1337:1337
ENTRYPOINT []
CMD ["ambientctl", "--help"]
