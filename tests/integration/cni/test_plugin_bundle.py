"""The self-contained plugin as a host runs it: `cni.plugin_bundle` really builds the PyInstaller bundle, the
node agent's `Installer` puts it into a bin dir, and the runtime execs `<bin>/istio-cni` with nothing but the
CNI environment — no venv on PATH, no PYTHONPATH, another working directory and, when we are root, the
build's Python and venv hidden by empty mounts. Every case runs the `ambient-cni` console script on the same
input against the same API server and fake node agent (test_plugin's fixtures) and expects the same answer,
including the lazily imported paths a frozen bundle could miss: YAML kubeconfig, TLS, custom selectors.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ambient.local import pki
from ambient.local.apiserver import ApiServer
from cni.installer import PLUGIN_TYPE, VERSIONS_DIR, Installer
from cni.plugin_bundle import build, tree_size
from tests.integration.cni import test_plugin
from tests.integration.cni.test_plugin import (
    AMBIENT,
    HOST,
    NAMESPACES,
    NETNS,
    PODS,
    PREV_0_4,
    PREV_1_0,
    RUN_LIMIT,
    TOKEN,
    Env,
    Run,
    expect_error,
    free_port,
    write_kubeconfig,
)

Obj = dict[str, Any]

# test_plugin's fixtures: a real API server on loopback with an ambient namespace and pod, a fake node agent.
short_dir, env = test_plugin.short_dir, test_plugin.env

CONSOLE_SCRIPT = Path(sys.executable).parent / "ambient-cni"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a host's, without the venv
MAX_BUNDLE_MB = 40  # ~19 MB stripped: libpython, OpenSSL and the stdlib closure of cni.plugin
# Must never be in the plugin: the agent's and proxies' dependencies (PyYAML is in, for YAML kubeconfigs).
HEAVY = ("aiohttp", "grpc", "google", "prometheus_client", "uvloop", "cryptography", "ambient.kube.client",
         "ambient.local", "cni.agent", "cni.rules")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.skip("PyInstaller is not installed (a dev dependency: pip install 'pyinstaller>=6'): cannot build "
                    "the plugin bundle")
    out = tmp_path_factory.mktemp("bundle") / "cni-plugin"
    build(out)
    return out


@pytest.fixture(scope="module")
def host_bin(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host's CNI bin dir after the node agent installed the bundle."""
    root = tmp_path_factory.mktemp("host")
    conf, bin_dir = root / "net.d", root / "bin"
    conf.mkdir()
    (conf / "10-net.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "net",
                                                       "plugins": [{"type": "bridge"}]}))
    assert Installer(conf, bin_dir, bundle, {"ambient_enabled": True}).install()
    return bin_dir


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin's working directory: not the repository, whose `cni` package must not be what runs."""
    return tmp_path_factory.mktemp("cwd")


def without_python(argv: list[str]) -> list[str]:
    """As root: `argv` in a private mount namespace where the venv and the interpreter it was built from are
    empty directories, so the bundle cannot lean on them."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return argv
    hidden = sorted({sys.prefix, sys.base_prefix})
    mounts = " && ".join(f'mount -t tmpfs tmpfs "${i + 1}"' for i in range(len(hidden)))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{mounts} && shift {len(hidden)} && exec "$@"', "sh", *hidden, *argv]


async def exec_plugin(argv: list[str], cwd: Path, conf: Obj | bytes | None, command: str = "ADD",
                      pod: tuple[str, str] | None = ("apps", "web-1")) -> Run:
    args = "IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=uid-1"
    if pod:
        args += f";K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]}"
    environ = {"PATH": CLEAN_PATH, "CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": NETNS,
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": args}
    stdin = conf if isinstance(conf, bytes) else b"" if conf is None else json.dumps(conf).encode()
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=environ, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), RUN_LIMIT)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def same_as_console_script(host_bin: Path, cwd: Path, env: Env | None, conf: Obj | bytes | None,
                                 command: str = "ADD", pod: tuple[str, str] | None = ("apps", "web-1")) -> Run:
    """Run the console script, then the installed bundle; both answer the same and tell the agent the same."""
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT}: install the project into the venv (scripts/setup.sh)"
    seen = env.agent.bodies if env else []
    before = len(seen)
    script = await exec_plugin([str(CONSOLE_SCRIPT)], cwd, conf, command, pod)
    by_script = seen[before:]
    bundled = await exec_plugin(without_python([str(host_bin / PLUGIN_TYPE)]), cwd, conf, command, pod)
    assert (bundled.code, bundled.stdout) == (script.code, script.stdout), (script, bundled)
    assert seen[before + len(by_script):] == by_script
    assert "Traceback" not in bundled.stderr, bundled.stderr
    return bundled


# -- the install ---------------------------------------------------------------------------------------
def test_the_bundle_is_small_lean_and_installed_behind_a_link(bundle: Path, host_bin: Path) -> None:
    from PyInstaller.archive.readers import CArchiveReader

    assert tree_size(bundle) < MAX_BUNDLE_MB * 1e6
    link = os.readlink(host_bin / PLUGIN_TYPE)
    assert link.startswith(f"{VERSIONS_DIR}/") and link.endswith(f"/{PLUGIN_TYPE}")
    assert not (host_bin / "_internal").exists(), "the bootloader finds _internal/ through the link"
    archive = CArchiveReader(str(bundle / PLUGIN_TYPE))
    assert "pyi_rth_inspect" not in archive.toc, "the inspect runtime hook costs ~15 ms per exec"
    modules = set(archive.open_embedded_archive("PYZ.pyz").toc)
    assert {"cni.plugin", "cni.config", "cni.cmdadd", "cni.cniversion", "ambient.kube.selectors", "yaml"} <= modules
    assert sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)) == []


async def test_the_clean_environment_really_hides_the_build_python(host_bin: Path, elsewhere: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("hiding the venv and the interpreter needs root and unshare; the bundle ran with a clean env only")
    run = await exec_plugin(without_python([str(CONSOLE_SCRIPT)]), elsewhere, b"", command="VERSION", pod=None)
    assert run.code != 0, "the console script must not find its interpreter where the bundle runs"
    assert (await exec_plugin(without_python([str(host_bin / PLUGIN_TYPE)]), elsewhere, b"", command="VERSION",
                              pod=None)).code == 0


# -- the same answers as the console script ------------------------------------------------------------
@pytest.mark.parametrize("stdin", [b'{"cniVersion": "0.4.0"}', b"", b"garbage"])
async def test_version(host_bin: Path, elsewhere: Path, stdin: bytes) -> None:
    run = await same_as_console_script(host_bin, elsewhere, None, stdin, command="VERSION", pod=None)
    assert run.code == 0
    assert run.output["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


async def test_add_enrolls_an_ambient_pod(host_bin: Path, elsewhere: Path, env: Env) -> None:
    run = await same_as_console_script(host_bin, elsewhere, env, env.conf())
    assert (run.code, run.output) == (0, PREV_1_0)
    assert [(b["PodNamespace"], b["PodName"]) for b in env.agent.bodies] == [("apps", "web-1")] * 2
    assert "enrolled in ambient" in run.stderr


async def test_add_converts_a_legacy_result_and_passes_other_pods_through(host_bin: Path, elsewhere: Path,
                                                                          env: Env) -> None:
    run = await same_as_console_script(host_bin, elsewhere, env, env.conf("1.1.0", PREV_0_4))
    assert run.code == 0 and run.output["cniVersion"] == "1.1.0"
    env.add_pod("plain", "other")
    run = await same_as_console_script(host_bin, elsewhere, env, env.conf(), pod=("plain", "other"))
    assert (run.code, run.output) == (0, PREV_1_0)
    assert len(env.agent.bodies) == 2


async def test_custom_enablement_selectors(host_bin: Path, elsewhere: Path, env: Env) -> None:
    env.add_namespace("team-a", {"team": "a"})
    env.add_pod("team-a", "api")
    conf = env.conf(enablement_selectors=[{"podSelector": {}, "namespaceSelector": {"matchLabels": {"team": "a"}}}])
    assert (await same_as_console_script(host_bin, elsewhere, env, conf, pod=("team-a", "api"))).code == 0
    assert [b["PodName"] for b in env.agent.bodies] == ["api", "api"]


@pytest.fixture
async def tls_kubeconfig(env: Env, short_dir: Path) -> AsyncIterator[Path]:
    """A YAML kubeconfig with a CA file, for an HTTPS API server holding the same objects as `env`'s."""
    ca, cert, key = pki.ensure_apiserver_certs(short_dir / "pki", [HOST], ["localhost"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    server = ApiServer(None, TOKEN)
    port = free_port()
    await server.start([HOST], port, tls)
    try:
        server.create(NAMESPACES, "", {"metadata": {"name": "apps", "labels": AMBIENT}})
        server.create(PODS, "apps", {"metadata": {"name": "web-1"}, "spec": {"containers": [{"name": "a"}]}})
        yield write_kubeconfig(short_dir / "tls-kubeconfig", f"https://{HOST}:{port}", as_yaml=True,
                               cluster={"certificate-authority-data": base64.b64encode(ca.read_bytes()).decode()})
    finally:
        await server.close()


async def test_add_over_tls_with_a_yaml_kubeconfig(host_bin: Path, elsewhere: Path, env: Env,
                                                   tls_kubeconfig: Path) -> None:
    run = await same_as_console_script(host_bin, elsewhere, env, env.conf(kubernetes={"kubeconfig":
                                                                                      str(tls_kubeconfig)}))
    assert (run.code, run.output) == (0, PREV_1_0)
    assert len(env.agent.bodies) == 2


async def test_failures_fail_closed_with_the_same_cni_error(host_bin: Path, elsewhere: Path, env: Env) -> None:
    env.agent.socket_path.unlink()
    expect_error(await same_as_console_script(host_bin, elsewhere, env, env.conf()), 101,
                 "is the istio-cni node agent running on this node?")
    expect_error(await same_as_console_script(host_bin, elsewhere, env, b"cniVersion: 1.0.0"), 6, "not JSON")


async def test_del_does_nothing(host_bin: Path, elsewhere: Path, env: Env) -> None:
    run = await same_as_console_script(host_bin, elsewhere, env, env.conf(prev=None), command="DEL")
    assert (run.code, run.stdout, env.agent.bodies) == (0, "", [])
