"""`parscale cost compare` in words: "more"/"less" follow the sign, the table is printed once,
how N equiv was costed is explained once, and memory has one unit (GiB)."""
from __future__ import annotations

import json
import re

import pytest

from parscale.cli.main import main
from parscale.cost.compare import METHOD_NOTES, against_parameters


@pytest.mark.parametrize("param, parscale, expected", [
    (180.17, 10.74, f"{180.17 / 10.74:.1f}x less latency"),   # 16.8x: ParScale adds less
    (508.65, 531.33, f"{531.33 / 508.65:.2f}x more latency"),  # 1.04x: ParScale adds more, not "0.96x less"
    (2.0, 2.0, "1.00x less latency"),
    (5.0, 0.0, "no added latency"),
    (0.0, 5.0, "more latency (parameter scaling adds none)"),
    (250.0, 2.0, "125x less latency"),
])
def test_the_word_follows_the_sign(param, parscale, expected):
    assert against_parameters(param, parscale, "latency") == expected


def _compare(capsys, *argv: str) -> tuple[str, list[dict]]:
    base = ["cost", "compare", "--preset", "1.6B", "--P", "2,8", "--batch-size", "1,8", *argv]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert main(base + ["--json"]) == 0
    return text, json.loads(capsys.readouterr().out)["rows"]


def test_compare_table_says_more_where_parscale_adds_more(capsys):
    text, rows = _compare(capsys, "--reference", "observed:paper-stack")
    lines = text.splitlines()
    table = lines[2:2 + len(rows)]
    for line, row in zip(table, rows):
        assert line.split()[:2] == [str(row["P"]), str(row["batch_size"])]
        slower = row["latency_increase_parscale_s"] > row["latency_increase_param_s"]
        assert ("more latency" in line) is slower and ("less latency" in line) is not slower
        assert "less memory" in line  # memory: ParScale adds less in every row here
    assert any("more latency" in line for line in table)  # P = 8 at batch 8: 531 against 509 ms
    # Each row once: no summary lines repeating the table, and the method explained once, in words.
    assert len(lines) == 2 + len(rows) + 2
    assert not any(line.startswith("P=") for line in lines) and "[ladder" not in text
    assert lines[-1] == f"N equiv: the P = 1 model of equal loss; its cost is {METHOD_NOTES[rows[0]['method']]}"


def test_an_extrapolated_equal_loss_model_is_marked_and_extends_the_nearest_sizes(capsys):
    from parscale.cost.roofline import PRESETS, non_embedding_params
    from parscale.law.points import load_points

    argv = ["cost", "compare", "--preset", "2.8B", "--P", "2,8", "--batch-size", "1", "--reference",
            "observed:paper-stack"]
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["extrapolated"] for r in rows] == [False, True]  # P = 8 beats every P = 1 size of the ladder
    # by hand: the line through the two largest sizes' (observed P = 1 loss, N), extended to the P = 8 loss
    pts = load_points("paper-stack")
    sizes = [non_embedding_params(shape) for shape in PRESETS.values()]
    loss = {int(n): float(y) for n, p, y in zip(pts.params, pts.streams, pts.loss) if p == 1}
    (n4, l4), (n5, l5) = (sizes[-2], loss[sizes[-2]]), (sizes[-1], loss[sizes[-1]])
    target = rows[1]["loss_parscale"]
    assert target < l5 and rows[1]["params_equivalent"] == pytest.approx(n4 + (target - l4) / (l5 - l4) * (n5 - n4))
    assert rows[1]["params_equivalent"] > n5 and rows[1]["memory_increase_param_gib"] > 0
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "B*" not in lines[2] and "B*" in lines[3]
    assert lines[-1] == ("*: N equiv lies beyond the sizes it is costed from: the line through the two nearest is "
                         "extended (extrapolated)")


def test_memory_has_one_unit(capsys):
    text, _ = _compare(capsys)
    assert main(["cost", "--preset", "1.6B", "--P", "4"]) == 0
    text += capsys.readouterr().out
    assert re.findall(r"\bGiB\b", text) and not re.findall(r"(?<![A-Za-z])GB(?!/s)", text)  # "3.416GB" too
