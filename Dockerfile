# One image with every entry point of pyproject's [project.scripts]: ambient-control, ambient-cni-agent,
# ambient-cni (the CNI plugin the agent installs), ztunnel, waypoint, ambientctl.
#   docker build -t ambient-py:0.1.0 . && kind load docker-image ambient-py:0.1.0

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
# The CNI plugin stays where the agent's installer looks for it (next to its interpreter, /opt/venv/bin)
# and is copied by the agent into the node's CNI bin dir as `istio-cni`.
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
# Istio's proxy uid. ambient-control runs as this user; ztunnel and the CNI agent set runAsUser: 0 in
# their DaemonSets because they enter pod network namespaces and program netfilter.
RUN groupadd --gid 1337 ambient && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin ambient
USER 1337:1337
ENTRYPOINT []
CMD ["ambientctl", "--help"]
