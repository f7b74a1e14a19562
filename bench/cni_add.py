"""CNI ADD latency of the istio-cni plugin (`python -m cni.plugin`), exec'd as a container runtime does.

Runs the plugin N times per scenario against a local API server on loopback (TLS by default, as the local
cluster serves it) and a fake node agent that answers `/cmdadd` at once, so the numbers are the plugin's
own cost: interpreter start-up, imports, the pod + namespace GETs, the POST. Then prints which imports the
ambient ADD path pays for. Prints only; asserts nothing.

    .venv/bin/python bench/cni_add.py [-n 50] [--plain-http]

Subprocesses run with a bytecode cache (PYTHONPYCACHEPREFIX in a temp dir), as an installed package has;
the "no bytecode cache" line shows the cost when the project's .pyc files cannot be written (e.g. with
PYTHONDONTWRITEBYTECODE=1 on a source checkout): every exec then compiles cni/ from source.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from ambient.kube.resources import ResourceTable
from ambient.local import pki
from ambient.local.apiserver import ApiServer

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TOKEN = "bench-token"
NETNS = "/var/run/netns/bench"
PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": NETNS}],
        "ips": [{"interface": 0, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


class Bench:
    def __init__(self, workdir: Path, runs: int, tls: bool) -> None:
        self.workdir, self.runs, self.tls = workdir, runs, tls
        self.posts = 0
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPYCACHEPREFIX": str(workdir / "pyc")}

    async def agent(self, request: web.Request) -> web.Response:
        await request.read()
        self.posts += 1
        return web.Response(text="")

    def kubeconfig(self, url: str, ca: Path | None, as_yaml: bool) -> Path:
        cluster: dict[str, Any] = {"server": url, **({"certificate-authority": str(ca)} if ca else {})}
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
               "clusters": [{"name": "c", "cluster": cluster}], "users": [{"name": "u", "user": {"token": TOKEN}}],
               "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}
        path = self.workdir / ("kubeconfig.yaml" if as_yaml else "kubeconfig.json")
        path.write_text(yaml.safe_dump(doc) if as_yaml else json.dumps(doc))
        return path

    def conf(self, kubeconfig: Path) -> bytes:
        return json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "istio-cni", "prevResult": PREV,
                           "cni_agent_run_dir": str(self.workdir), "ambient_enabled": True,
                           "plugin_log_level": "error", "kubernetes": {"kubeconfig": str(kubeconfig)}}).encode()

    async def exec(self, argv: list[str], command: str, stdin: bytes, pod: tuple[str, str],
                   extra_env: dict[str, str] | None = None) -> tuple[float, bytes]:
        env = {**self.env, "CNI_COMMAND": command, "CNI_CONTAINERID": "bench", "CNI_NETNS": NETNS,
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]}", **(extra_env or {})}
        env = {key: value for key, value in env.items() if value}  # "" unsets
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, env=env, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(stdin)
        elapsed = (time.perf_counter() - started) * 1000
        if proc.returncode != 0:
            raise SystemExit(f"{command} failed ({proc.returncode}): {out.decode()} {err.decode()[-2000:]}")
        return elapsed, err

    async def scenario(self, label: str, argv: list[str], command: str, stdin: bytes, pod: tuple[str, str],
                       extra_env: dict[str, str] | None = None) -> None:
        await self.exec(argv, command, stdin, pod, extra_env)  # warm: bytecode cache, page cache
        samples = [(await self.exec(argv, command, stdin, pod, extra_env))[0] for _ in range(self.runs)]
        print(f"  {label:<46} p50 {percentile(samples, 50):6.1f} ms   p99 {percentile(samples, 99):6.1f} ms")

    async def run(self) -> None:
        server = ApiServer(None, TOKEN)
        rts = ResourceTable()
        server.create(rts.require("namespaces"), "", {"metadata": {"name": "mesh",
                                                                     "labels": {"istio.io/dataplane-mode": "ambient"}}})
        server.create(rts.require("namespaces"), "", {"metadata": {"name": "plain"}})
        for ns in ("mesh", "plain"):
            server.create(rts.require("pods"), ns, {"metadata": {"name": "app"},
                                                    "spec": {"containers": [{"name": "app", "image": "app"}]}})
        ca = tls_context = None
        if self.tls:
            ca, cert, key = pki.ensure_apiserver_certs(self.workdir / "pki", [HOST], ["localhost"])
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(cert, key)
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        app = web.Application()
        app.router.add_post("/cmdadd", self.agent)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await server.start([HOST], port, tls_context)
            await web.UnixSite(runner, str(self.workdir / "pluginevent.sock")).start()
            url = f"{'https' if self.tls else 'http'}://{HOST}:{port}"
            json_conf = self.conf(self.kubeconfig(url, ca, as_yaml=False))
            yaml_conf = self.conf(self.kubeconfig(url, ca, as_yaml=True))
            plugin = [sys.executable, "-m", "cni.plugin"]
            print(f"CNI ADD latency, {self.runs} runs each, API server {url}, Python {sys.version.split()[0]}")
            await self.scenario("interpreter start-up (python -c pass)", [sys.executable, "-c", "pass"], "VERSION",
                                b"", ("", ""))
            await self.scenario("VERSION", plugin, "VERSION", b'{"cniVersion": "1.0.0"}', ("", ""))
            await self.scenario("ADD, not ambient (API lookup only)", plugin, "ADD", json_conf, ("plain", "app"))
            await self.scenario("ADD, ambient (API + /cmdadd), JSON kubeconfig", plugin, "ADD", json_conf,
                                ("mesh", "app"))
            await self.scenario("ADD, ambient, YAML kubeconfig (loads PyYAML)", plugin, "ADD", yaml_conf,
                                ("mesh", "app"))
            await self.scenario("ADD, ambient, JSON, no bytecode cache for cni/", plugin, "ADD", json_conf,
                                ("mesh", "app"), {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": ""})
            print(f"  (/cmdadd requests answered: {self.posts})")
            _, err = await self.exec([sys.executable, "-X", "importtime", "-m", "cni.plugin"], "ADD", json_conf,
                                     ("mesh", "app"))
            print_imports(err.decode())
        finally:
            await runner.cleanup()
            await server.close()


def print_imports(stderr: str) -> None:
    """Top-level imports of the ambient ADD path (cumulative µs → ms), ignoring what site.py already did."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if not name.startswith(" ") or name.startswith("  "):
            continue
        rows.append((int(cumulative) / 1000, name.strip()))
    site_index = next((i for i, (_, name) in enumerate(rows) if name == "site"), -1)
    ours = rows[site_index + 1:]
    print(f"Imports paid by an ambient ADD (after interpreter start-up), total {sum(ms for ms, _ in ours):.1f} ms:")
    for ms, name in sorted(ours, reverse=True):
        if ms >= 0.3:
            print(f"  {name:<28} {ms:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=50)
    parser.add_argument("--plain-http", action="store_true", help="serve the API over http instead of https")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cni-bench-", dir="/tmp"))
    try:
        asyncio.run(Bench(workdir, args.runs, not args.plain_http).run())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
