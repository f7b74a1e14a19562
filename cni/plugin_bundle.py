"""Build the self-contained `istio-cni` plugin that the node agent installs on hosts: a PyInstaller onedir
bundle, `OUTDIR/istio-cni` (the bootloader) plus `OUTDIR/_internal/` (libpython, the stdlib modules and
shared libraries `cni.plugin` uses, PyYAML for YAML kubeconfigs).

    .venv/bin/python -m cni.plugin_bundle OUTDIR

Why a bundle: the `ambient-cni` console script's shebang names the image's `/opt/venv/bin/python`, which a
host does not have. Why onedir: a onefile executable unpacks itself into a temporary directory on every
exec, i.e. on every pod ADD and DEL. The bundle carries its interpreter but not glibc: it runs on hosts
whose glibc is at least the build machine's (the Dockerfile builds it on Debian bullseye, glibc 2.31).

The bundle holds what the entry script (`from cni.plugin import main`) reaches, nothing else. Build-time
only: it needs PyInstaller (a dev dependency) and binutils, and nothing imports this module at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cni.installer import PLUGIN_TYPE

ROOT = Path(__file__).resolve().parents[1]  # the source tree holding the `cni` and `ambient` packages
ENTRY = "from cni.plugin import main\n\nmain()\n"
# PyYAML's C extension: the plugin's `yaml.safe_load` is pure Python (and 0.4 MB less to copy to every node).
EXCLUDES = ("yaml._yaml", "_yaml")
# PyInstaller adds this runtime hook because `dataclasses` (custom enablement selectors) imports `inspect`; it
# imports `inspect` and reads base_library.zip at every start (~15 ms per exec) to patch
# `inspect.getsourcefile`, which the plugin never calls.
DROPPED_RUNTIME_HOOKS = ("pyi_rth_inspect",)
SPEC = """\
a = Analysis([{entry!r}], pathex=[{root!r}], excludes={excludes!r})
a.scripts = [s for s in a.scripts if s[0] not in {dropped!r}]
pyz = PYZ(a.pure)
exe = EXE(pyz, a.scripts, exclude_binaries=True, name={name!r}, strip=True, upx=False, console=True)
COLLECT(exe, a.binaries, a.datas, strip=True, upx=False, name={name!r})
"""


class BuildError(Exception):
    """The bundle cannot be built; the message says what to install or change."""


def build(outdir: Path) -> Path:
    """Build the bundle into `outdir` (which must not exist or be empty) with this interpreter's PyInstaller
    → the bundle's executable."""
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise BuildError(f"{outdir} exists and is not an empty directory: choose a new output directory")
    if importlib.util.find_spec("PyInstaller") is None:
        raise BuildError(f"PyInstaller is not installed for {sys.executable}: pip install 'pyinstaller>=6' "
                         "(a dev dependency of this project)")
    with tempfile.TemporaryDirectory(prefix="istio-cni-build-") as tmp:
        work = Path(tmp)
        (work / "istio_cni.py").write_text(ENTRY)
        spec = work / "istio-cni.spec"
        spec.write_text(SPEC.format(entry=str(work / "istio_cni.py"), root=str(ROOT), excludes=list(EXCLUDES),
                                    dropped=DROPPED_RUNTIME_HOOKS, name=PLUGIN_TYPE))
        argv = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                "--distpath", str(work / "dist"), "--workpath", str(work / "build"), str(spec)]
        done = subprocess.run(argv, cwd=work, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"PyInstaller failed (exit {done.returncode}):\n{done.stderr.strip()[-4000:]}")
        outdir.mkdir(parents=True, exist_ok=True)
        for entry in (work / "dist" / PLUGIN_TYPE).iterdir():
            shutil.move(entry, outdir / entry.name)
    return outdir / PLUGIN_TYPE


def tree_size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cni.plugin_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="where the bundle goes (created; must not exist or be empty)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        executable = build(args.outdir)
    except BuildError as exc:
        sys.exit(f"cni.plugin_bundle: {exc}")
    print(f"built {executable} ({tree_size(args.outdir) / 1e6:.1f} MB in {args.outdir}) in "
          f"{time.monotonic() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
