"""`ambient-cni`: the chained CNI plugin (installed as type `istio-cni`) that the container runtime runs for
every pod (PROTOCOLS.md §3).

ADD reads the pod and its namespace from the Kubernetes API; for an ambient pod it asks the node agent,
over `POST /cmdadd` on `<cni_agent_run_dir>/pluginevent.sock`, to enroll the pod before any container
starts, then passes the previous plugin's result on (in the configuration's spec version). It fails
closed: if anything on that path fails, ADD fails with a CNI error that says what to check, so no pod
starts without its traffic captured. DEL, CHECK, GC and STATUS do nothing (the agent removes pods
from its pod informer). VERSION answers the supported spec versions.

It runs on the pod-creation critical path, once per pod, as a fresh process: imports are stdlib only
and the costly ones (`http.client`/`ssl`, PyYAML for a YAML kubeconfig) load only on the path that needs
them; `bench/cni_add.py` measures it. Nothing but the result or the CNI error goes to stdout: logs go to
stderr (and `plugin_log_file` if set).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, BinaryIO, TextIO

from cni.cmdadd import CMDADD_PATH, MAX_BODY, TIMEOUT, CmdAddError, build_cmdadd
from cni.cniversion import convert_result
from cni.config import (
    ERR_AGENT,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_KUBE,
    LATEST_VERSION,
    SUPPORTED_VERSIONS,
    ApiTarget,
    CniEnv,
    CniError,
    PluginConf,
    agent_socket,
    api_target,
    check_command_version,
    is_agent_pod,
    parse_env,
    parse_netconf,
    parse_plugin_conf,
    select_ambient,
)

Obj = dict[str, Any]

KUBE_TIMEOUT = 5.0  # seconds per API request: a slow API server fails the ADD (the kubelet retries) instead of
# holding the pod in ContainerCreating indefinitely
LOG_LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "none": 100}
AGENT_HINT = "check the node agent's logs (kubectl logs -n istio-system ds/istio-cni-node, or ambientctl logs)"


class PluginLog:
    """Leveled log lines to stderr and optionally a file. (Not `logging`: ~7 ms of imports per pod.)"""

    def __init__(self, stderr: TextIO, level: str = "info") -> None:
        self._sinks: list[TextIO] = [stderr]
        self._level = LOG_LEVELS[level]
        self.context = ""  # e.g. "pod=ns/name ", once known

    def configure(self, level: str, file: str | None) -> None:
        self._level = LOG_LEVELS[level]
        if file:
            try:
                self._sinks.append(open(file, "a", encoding="utf-8"))  # noqa: SIM115 - lives for the process
            except OSError as exc:
                self.warn(f"cannot open plugin_log_file {file}: {exc.strerror}; logging to stderr only")

    def debug(self, msg: str) -> None:
        self._emit(10, "debug", msg)

    def info(self, msg: str) -> None:
        self._emit(20, "info", msg)

    def warn(self, msg: str) -> None:
        self._emit(30, "warn", msg)

    def error(self, msg: str) -> None:
        self._emit(40, "error", msg)

    def _emit(self, level: int, name: str, msg: str) -> None:
        if level < self._level:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        line = f"{stamp}\t{name}\tistio-cni {self.context}{msg}\n"
        for sink in self._sinks:
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError):
                pass


# -- entry point -------------------------------------------------------------------------------------
def main() -> None:
    sys.exit(run(os.environ, sys.stdin.buffer, sys.stdout, sys.stderr))


def run(environ: Mapping[str, str], stdin: BinaryIO, stdout: TextIO, stderr: TextIO) -> int:
    """One CNI invocation → exit status; the result or the CNI error object is written to `stdout`."""
    log = PluginLog(stderr)
    version = LATEST_VERSION
    try:
        if environ.get("CNI_COMMAND") == "VERSION":
            stdout.write(json.dumps(version_info(b"" if stdin.isatty() else stdin.read())) + "\n")
            return 0
        env = parse_env(environ)
        net = parse_netconf(stdin.read())
        version = net.cni_version
        check_command_version(env.command, version)
        if env.command == "ADD":
            conf = parse_plugin_conf(net, env.command)
            log.configure(conf.log_level, conf.log_file)
            stdout.write(json.dumps(cmd_add(env, conf, log)) + "\n")
            return 0
        try:  # DEL must never get stuck on a config problem: only the basics above are required
            conf = parse_plugin_conf(net, env.command)
            log.configure(conf.log_level, conf.log_file)
        except CniError as exc:
            log.warn(f"{env.command}: ignoring invalid plugin settings: {exc}")
        log.debug(f"{env.command} container={env.container_id}: nothing to do")
        return 0
    except CniError as exc:
        log.error(f"failed ({exc.reason}): {exc}")
        stdout.write(json.dumps(exc.to_json(version)) + "\n")
        return 1
    except Exception as exc:  # a bug must still fail closed, with something to report
        import traceback

        log.error(traceback.format_exc())
        error = CniError(ERR_INTERNAL, f"istio-cni internal error: {exc!r}", "a bug in the plugin; its stderr "
                         "log has the traceback")
        stdout.write(json.dumps(error.to_json(version)) + "\n")
        return 1


def version_info(stdin: bytes) -> Obj:
    """VERSION: the configuration's version when it is one we support, else the latest."""
    try:
        requested = json.loads(stdin).get("cniVersion") if stdin.strip() else None
    except (ValueError, AttributeError, RecursionError):
        requested = None
    return {"cniVersion": requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION,
            "supportedVersions": list(SUPPORTED_VERSIONS)}


# -- ADD ---------------------------------------------------------------------------------------------
def cmd_add(env: CniEnv, conf: PluginConf, log: PluginLog) -> Obj:
    assert conf.prev_result is not None  # parse_plugin_conf requires it for ADD
    result = convert_result(conf.prev_result, conf.cni_version)
    name, namespace = env.pod_name, env.pod_namespace
    log.context = f"pod={namespace}/{name} " if name and namespace else f"container={env.container_id} "
    if not conf.ambient_enabled:
        log.debug("ambient_enabled is false: passing the result on")
        return result
    if not name or not namespace:
        log.info("not a Kubernetes pod (no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS): passing the result on")
        return result
    if namespace in conf.exclude_namespaces:
        log.info(f"namespace {namespace} is excluded: passing the result on")
        return result
    if is_agent_pod(conf, name, namespace):
        log.info("the node agent's own pod: passing the result on")
        return result
    started = time.monotonic()
    assert conf.kubeconfig is not None  # parse_plugin_conf requires it for ADD with ambient on
    pod, ns = read_pod_and_namespace(conf.kubeconfig, namespace, name)
    looked_up = time.monotonic()
    selection = select_ambient(pod, ns, conf.exclude_namespaces, conf.enablement_selectors)
    if not selection.ambient:
        log.info(f"not ambient ({selection.reason}): passing the result on")
        return result
    try:
        payload = build_cmdadd(env.netns, name, namespace, result)
    except CmdAddError as exc:
        raise CniError(ERR_INVALID_CONFIG, str(exc), "the previous plugin in the chain returned a malformed "
                                                     "result") from None
    socket_path = agent_socket(conf)
    post_cmdadd(socket_path, json.dumps(payload).encode())
    done = time.monotonic()
    log.info(f"enrolled in ambient ({selection.reason}); API {(looked_up - started) * 1000:.1f} ms, "
             f"agent {(done - looked_up) * 1000:.1f} ms")
    return result


# -- Kubernetes API ----------------------------------------------------------------------------------
def read_pod_and_namespace(kubeconfig: str, namespace: str, name: str) -> tuple[Obj, Obj]:
    from urllib.parse import quote

    reader = KubeReader(read_kubeconfig(kubeconfig), kubeconfig)
    try:
        pod = reader.get(f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}", f"pod {namespace}/{name}")
        ns = reader.get(f"/api/v1/namespaces/{quote(namespace)}", f"namespace {namespace}")
    finally:
        reader.close()
    return pod, ns


def read_kubeconfig(path: str) -> ApiTarget:
    """JSON kubeconfigs parse with the stdlib; YAML ones load PyYAML (~13 ms) only when needed."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise CniError(ERR_KUBE, f"cannot read the plugin kubeconfig {path}: {exc.strerror}",
                       "the node agent's installer writes it (kubernetes.kubeconfig in the CNI config); is the "
                       "istio-cni node agent installed on this node?") from None
    try:
        if text.lstrip()[:1] == b"{":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:  # JSON or YAML syntax errors, undecodable bytes
        raise CniError(ERR_KUBE, f"cannot parse the plugin kubeconfig {path}: {exc}",
                       "the node agent's installer writes it; reinstall or restart the node agent") from None
    return api_target(doc, path)


class KubeReader:
    """GETs on one keep-alive connection, with the kubeconfig's server, CA and credentials."""

    def __init__(self, target: ApiTarget, kubeconfig: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        self.target, self.kubeconfig = target, kubeconfig
        url = urlsplit(target.server)
        self._prefix = url.path.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "istio-cni"}
        token = target.token or self._read_token_file()
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        host = url.hostname or ""
        self._conn: http.client.HTTPConnection
        if url.scheme == "https":
            self._conn = http.client.HTTPSConnection(host, url.port or 443, timeout=KUBE_TIMEOUT,
                                                     context=self._ssl_context())
        else:
            self._conn = http.client.HTTPConnection(host, url.port or 80, timeout=KUBE_TIMEOUT)

    def _fail(self, msg: str, check: str) -> CniError:
        return CniError(ERR_KUBE, msg, f"{check} (the plugin uses the kubeconfig {self.kubeconfig})")

    def _read_token_file(self) -> str | None:
        if not self.target.token_file:
            return None
        try:
            with open(self.target.token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise self._fail(f"cannot read the token file {self.target.token_file}: {exc.strerror}",
                             "the node agent's installer writes it") from None

    def _ssl_context(self) -> Any:
        import ssl

        target = self.target
        try:
            ctx = ssl.create_default_context(cafile=target.ca_file, cadata=target.ca_data)
            if target.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if target.client_cert_data or target.client_cert:
                _load_client_cert(ctx, target)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise self._fail(f"cannot load the TLS settings of the plugin kubeconfig: {exc}",
                             "check certificate-authority(-data) and client-certificate/key") from None
        return ctx

    def get(self, path: str, what: str) -> Obj:
        import http.client
        import ssl

        server = self.target.server
        try:
            self._conn.request("GET", self._prefix + path, headers=self._headers)
            response = self._conn.getresponse()
            body = response.read()
        except TimeoutError:
            raise self._fail(f"the Kubernetes API server at {server} did not answer within {KUBE_TIMEOUT:.0f}s "
                             f"when reading {what}", "is the API server overloaded or unreachable from "
                             "this node?") from None
        except ssl.SSLCertVerificationError as exc:
            raise self._fail(f"the Kubernetes API server at {server} has an untrusted certificate: "
                             f"{exc.verify_message}", "its certificate must be signed by the kubeconfig's "
                             "certificate-authority") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._fail(f"cannot reach the Kubernetes API server at {server} to read {what}: "
                             f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}",
                             "is the API server reachable from this node?") from None
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {}
        if response.status == 200 and isinstance(doc, dict):
            return doc
        message = doc.get("message") if isinstance(doc, dict) else None
        message = message or body[:200].decode("utf-8", "replace") or response.reason
        if response.status == 404:
            raise self._fail(f"{what} not found in the Kubernetes API at {server}",
                             "the plugin fails closed: it must see the pod's labels before the pod may start; "
                             "was the pod deleted, or do the kubelet and the plugin use different clusters?")
        if response.status in (401, 403):
            raise self._fail(f"the Kubernetes API server refused to return {what} ({response.status}: {message})",
                             "the plugin's token may be expired or lack RBAC to get pods and namespaces; "
                             "the node agent rewrites it")
        raise self._fail(f"the Kubernetes API server answered {response.status} when reading {what}: {message}",
                         "check the API server")

    def close(self) -> None:
        self._conn.close()


def _load_client_cert(ctx: Any, target: ApiTarget) -> None:
    """`client-certificate(-data)`/`client-key(-data)`; ssl loads chains from files only, so inline data
    goes through a private temporary directory."""
    if not (target.client_cert_data or target.client_key_data):
        ctx.load_cert_chain(target.client_cert, target.client_key)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="istio-cni-") as tmp:
        cert, key = target.client_cert, target.client_key
        if target.client_cert_data:
            cert = os.path.join(tmp, "client.crt")
            with open(cert, "wb") as f:
                f.write(target.client_cert_data)
        if target.client_key_data:
            key = os.path.join(tmp, "client.key")
            with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(target.client_key_data)
        ctx.load_cert_chain(cert, key)


# -- node agent --------------------------------------------------------------------------------------
def post_cmdadd(socket_path: str, body: bytes, timeout: float = TIMEOUT) -> None:
    """`POST /cmdadd` on the agent's unix socket; returns when the agent answered 200 within `timeout`."""
    import http.client
    import socket

    prefix = "istio-cni cmdAdd failed to contact node Istio CNI agent"  # Istio's wording, which users grep for
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = http.client.HTTPConnection("unix", timeout=timeout)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        conn.sock = sock  # an HTTP/1.1 connection over the unix socket
        conn.request("POST", CMDADD_PATH, body=body, headers={"Content-Type": "application/json"})
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        response = conn.getresponse()
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        reason = response.read(MAX_BODY).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        raise CniError(ERR_AGENT, f"{prefix}: socket {socket_path} not found",
                       f"is the istio-cni node agent running on this node? socket {socket_path} not found "
                       "(the agent creates it in cni_agent_run_dir)") from None
    except ConnectionRefusedError:
        raise CniError(ERR_AGENT, f"{prefix}: connection refused on {socket_path}",
                       f"the socket exists but no agent accepts on it: is the node agent restarting? "
                       f"{AGENT_HINT}") from None
    except TimeoutError:
        raise CniError(ERR_AGENT, f"{prefix}: no answer on {socket_path} within {timeout:g}s",
                       "the agent may be stuck enrolling the pod (does ztunnel run on this node and ack?); "
                       f"{AGENT_HINT}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise CniError(ERR_AGENT, f"{prefix}: {exc}", f"socket {socket_path}; {AGENT_HINT}") from None
    finally:
        conn.close()
        sock.close()
    if response.status != 200:
        what = ("rejected the request" if response.status == 400 else "could not enroll the pod")
        raise CniError(ERR_AGENT, f"{prefix}: unable to push CNI event (status code {response.status}): {reason}",
                       f"the node agent {what}: {reason or response.reason}; {AGENT_HINT}")


if __name__ == "__main__":
    main()
