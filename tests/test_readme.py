"""The README's Python quick start runs as written (in a scratch directory)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # its own asserts check the round trip
    assert (tmp_path / "p4-model" / "model.safetensors").is_file()
    assert namespace["model"].parscale_config.n_streams == 4


def test_the_readme_starts_with_exactly_make_demo_and_make_test():
    """The first code block is the two commands a newcomer runs, nothing else."""
    first = re.search(r"```\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["make demo", "make test"]
