"""`parscale.machine`: the CPU named from /proc/cpuinfo alike everywhere, and every benchmark using it.

The expected names and flags below are read by eye off the fake /proc/cpuinfo texts, not
produced by the code under test.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import platform
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from parscale import machine

ROOT = Path(__file__).resolve().parent.parent

# Two processor blocks, as Linux writes them; the second repeats the first.
XEON_BLOCK = """processor\t: {n}
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 avx512f avx512dq avx512cd \
avx512bw avx512vl avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8 arch_capabilities
bugs\t\t: spectre_v1
"""
XEON = "\n".join(XEON_BLOCK.format(n=n) for n in range(2))
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi1 bmi2 sha_ni
"""


def test_an_intel_xeon_with_avx512_and_amx():
    cpu = machine.cpu_info(XEON)
    assert cpu["name"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert cpu["flags"] == ["amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512_vnni",
                            "avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl", "fma"]
    assert (cpu["avx2"], cpu["avx512"], cpu["amx"]) == (True, True, True)
    assert cpu["summary"] == "avx2 fma avx512[bf16,bw,cd,dq,f,vl,vnni] amx[bf16,int8,tile]"


def test_an_amd_epyc_with_avx2_only():
    cpu = machine.cpu_info(EPYC)
    assert cpu["name"] == "AMD EPYC 7B12"
    assert cpu["flags"] == ["avx", "avx2", "fma"]
    assert (cpu["avx2"], cpu["avx512"], cpu["amx"]) == (True, False, False)
    assert cpu["summary"] == "avx2 fma no avx512"
    assert machine.header(cpu) == f"CPU: AMD EPYC 7B12 (avx2 fma no avx512), {os.cpu_count()} cores"


def test_cores_and_load_are_this_machines():
    cpu = machine.cpu_info(EPYC)
    assert cpu["cores"] == os.cpu_count() and cpu["arch"] == platform.machine()
    assert cpu["load_average"] == pytest.approx(os.getloadavg()[0], abs=2.0)  # moves between the two reads


def test_no_proc_cpuinfo_still_names_the_cpu(monkeypatch, tmp_path):
    """macOS and Windows have no /proc/cpuinfo: the name is platform.processor()'s."""
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    cpu = machine.cpu_info()
    assert cpu["name"] == "arm" and cpu["flags"] == [] and cpu["avx512"] is False
    monkeypatch.setattr(platform, "processor", lambda: "")  # Linux without the file: the architecture
    assert machine.cpu_info()["name"] == platform.machine()


def test_the_real_cpu_has_a_name():
    cpu = machine.cpu_info()
    assert cpu["name"] and cpu["cores"] >= 1
    if Path("/proc/cpuinfo").exists() and platform.machine() == "x86_64":
        assert cpu["avx2"] == (" avx2" in Path("/proc/cpuinfo").read_text())


def test_describe_without_and_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = machine.describe()
    assert set(info) == {"cpu", "gpu", "torch", "python"}
    assert info["gpu"] is None and info["torch"] == torch.__version__ and info["python"] == platform.python_version()
    assert machine.header(info).startswith(f"CPU: {info['cpu']['name']} (")
    props = SimpleNamespace(name="NVIDIA H200", total_memory=143 * 2**30, major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = machine.describe()["gpu"]
    assert gpu == {"name": "NVIDIA H200", "memory_gib": 143.0, "capability": "9.0", "multiprocessors": 132, "count": 1}
    assert machine.header({"cpu": machine.cpu_info(EPYC), "gpu": gpu}).endswith(
        "cores; GPU: NVIDIA H200 (143.0 GiB, compute capability 9.0)")


def test_the_demo_keeps_the_keys_its_report_reads(monkeypatch):
    from parscale.demo.study import machine as demo_machine

    monkeypatch.setattr(machine, "CPUINFO", type("Fake", (), {"read_text": staticmethod(lambda: XEON)})())
    info = demo_machine()
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert info["avx512"] is True and info["amx"] is True and info["cores"] == os.cpu_count()
    assert info["flags"] == "avx2 fma avx512[bf16,bw,cd,dq,f,vl,vnni] amx[bf16,int8,tile]"
    assert len(info["load_average"]) == 3  # the report reads [0] at the start and at the end


# ---------------------------------------------------------------- every benchmark names its machine
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def _calls(path: Path) -> set[str]:
    return {getattr(node.func, "attr", getattr(node.func, "id", "")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)}


def test_the_benchmarks_are_found():
    assert {"decode.py", "gpu.py", "fit_speed.py", "train_throughput.py"} <= {p.name for p in BENCHMARKS}


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_names_its_machine(path):
    """Every benchmark prints a table and writes JSON (benchmarks/README.md): both name the CPU."""
    calls = _calls(path)
    assert calls & {"describe", "write_result"}, \
        f"{path.name} writes a result without parscale.machine.describe() or _result.write_result()"
    assert "header" in calls, f"{path.name} prints a table without parscale.machine.header()'s CPU line"


def test_the_shared_tail_adds_the_command_and_the_machine(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("_result", ROOT / "benchmarks" / "_result.py")
    tail = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tail)
    out = tmp_path / "deep" / "fit_speed.json"
    tail.write_result(out, {"rows": [1.5]}, "/any/where/benchmarks/fit_speed.py", ["--repeats", "2"])
    written = json.loads(out.read_text())
    assert written["command"] == "python benchmarks/fit_speed.py --repeats 2" and written["rows"] == [1.5]
    assert set(written["machine"]) == {"cpu", "gpu", "torch", "python"}
    assert written["machine"]["cpu"]["name"] == machine.cpu_info()["name"]
    assert f"wrote {out}" in capsys.readouterr().out
    tail.write_result(out, {"command": "python benchmarks/x.py --run runs/p2"}, "x.py", [])
    assert json.loads(out.read_text())["command"] == "python benchmarks/x.py --run runs/p2"  # its own is kept


def test_only_the_helper_reads_proc_cpuinfo_for_a_report():
    readers = [p.relative_to(ROOT) for p in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "src/parscale/demo").rglob("*.py")]
               if "/proc/cpuinfo" in p.read_text()]
    assert not readers, readers
