"""The Dockerfile, checked statically (no Docker engine here): what it copies exists, it is multi-stage on a
slim Python, the final stage has the agent's tools and a non-root user, the self-contained CNI plugin bundle
is built and lands where the agent installs it from, and every entry point the manifests run is one
pyproject installs."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

from ambient.cli.install import render
from cni.agent_config import PLUGIN_BUNDLE

ROOT = Path(__file__).resolve().parents[3]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Stage name (or its index) → (base image, its instructions)."""
    out: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    steps: list[tuple[str, str]] = []
    for word, args in instructions():
        if word == "FROM":
            parts = args.split()
            steps = []
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(out))
            out[name] = (parts[0], steps)
        else:
            steps.append((word, args))
    return out


def scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def test_every_copy_source_from_the_context_exists() -> None:
    copies = [args for word, args in instructions() if word == "COPY"]
    assert copies
    for args in copies:
        parts = shlex.split(args)
        if any(p.startswith("--from=") for p in parts):
            continue
        sources = [p for p in parts[:-1] if not p.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"


def test_copied_sources_are_not_excluded_by_dockerignore() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for word, args in instructions():
        if word == "COPY" and "--from=" not in args:
            for source in shlex.split(args)[:-1]:
                assert source.rstrip("/") not in ignored, f"COPY {source} but .dockerignore drops it"


def test_multi_stage_on_slim_python_with_agent_tools_and_non_root_user() -> None:
    steps = instructions()
    bases = [args for word, args in steps if word == "FROM"]
    assert len(bases) >= 2 and all(b.split()[0] in ("python:3.11-slim", "python:3.11-slim-bullseye") for b in bases)
    assert bases[-1].split()[0] == "python:3.11-slim"
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    runs = " ".join(args for word, args in final if word == "RUN")
    for tool in ("iptables", "nftables", "ipset", "iproute2"):
        assert tool in runs.split(), f"the final stage does not install {tool}"
    users = [args for word, args in final if word == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the image must default to a non-root user"
    assert any("--from=builder" in args and "/opt/venv" in args for word, args in final if word == "COPY")


def test_the_console_script_plugin_is_installed() -> None:
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert "test -x /opt/venv/bin/ambient-cni" in runs
    assert "ambient-cni" in scripts()


def test_the_plugin_bundle_is_built_and_copied_where_the_agent_installs_it_from() -> None:
    # cni/agent_config.py: the agent's default --plugin-source is PLUGIN_BUNDLE when it exists.
    all_stages = stages()
    final = all_stages[list(all_stages)[-1]][1]
    copies = [shlex.split(args) for word, args in final if word == "COPY" and args.split()[-1] == PLUGIN_BUNDLE]
    assert len(copies) == 1, f"the final stage must COPY the plugin bundle to {PLUGIN_BUNDLE}"
    source_stage, built = copies[0][0].removeprefix("--from="), copies[0][1]
    base, steps = all_stages[source_stage]
    # The bundle uses the host's glibc: built on the oldest base, it runs on the most hosts (glibc >= 2.31).
    assert base == "python:3.11-slim-bullseye"
    runs = [shlex.split(args) for word, args in steps if word == "RUN"]
    assert any(run[:4] == ["python", "-m", "cni.plugin_bundle", built] for run in runs), runs
    assert any("pyinstaller" in arg for run in runs for arg in run), "the bundle stage installs PyInstaller"
    assert any(f"{built}/istio-cni" in run for run in runs), "the bundle stage checks the bundle runs"
    assert (ROOT / "cni" / "plugin_bundle.py").is_file()


def test_every_command_the_manifests_run_is_a_project_script() -> None:
    installed = scripts()
    commands = set()
    for obj in render():
        spec = (obj.get("spec") or {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            argv = container.get("command") or container.get("args") or []
            assert argv, f"{obj['kind']} {obj['metadata']['name']}: container {container['name']} has no command"
            commands.add(argv[0])
    assert commands == {"ambient-control", "ambient-cni-agent", "ztunnel"}
    assert commands <= installed, f"not installed by pyproject: {commands - installed}"


def test_the_waypoint_command_the_controller_uses_is_a_project_script() -> None:
    from ambient.control.main import ControlConfig
    from ambient.control.waypoints import DEFAULT_COMMAND

    assert DEFAULT_COMMAND[0] in scripts()
    assert ControlConfig(kubeconfig=None).waypoint_command[0] in scripts()
