"""A fit with a parameter on its bound, and a prediction beyond the data's P range, are flagged:
a field in the result and a warning line in `parscale fit`'s output."""
from __future__ import annotations

import json

import numpy as np

from parscale.cli.main import main
from parscale.law import fitting as L

N = np.array([1e8, 3e8, 1e9, 3e9] * 3)
P = np.repeat([1.0, 2.0, 4.0], 4)


def _planted(E: float) -> np.ndarray:
    """L(N, P) with A = 0.5, alpha = 0.3, k = 0.4, computed here by hand."""
    return E + (0.5e9 / (N * (0.4 * np.log(P) + 1.0))) ** 0.3


def _csv(tmp_path, loss) -> str:
    path = tmp_path / "runs.csv"
    path.write_text("params,P,loss\n" + "".join(f"{n},{p},{y}\n" for n, p, y in zip(N, P, loss)))
    return str(path)


def test_a_parameter_at_its_bound_is_in_the_result():
    at_zero = L.fit(N, P, _planted(0.0))  # the loss has no floor: the best E is the bound itself
    assert at_zero.at_bound == ("E",) and at_zero.E <= L.AT_BOUND
    inside = L.fit(N, P, _planted(0.7))
    assert inside.at_bound == () and abs(inside.E - 0.7) < 1e-6


def test_fit_prints_a_warning_for_a_parameter_at_its_bound(tmp_path, capsys):
    data = _csv(tmp_path, _planted(0.0))
    assert main(["fit", "--data", data, "--bootstrap", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "converged: yes (best of 300 starts)" in lines  # converged, and still flagged
    warning = [line for line in lines if line.startswith("warning: ")]
    assert warning == ["warning: E is at its lower bound (0): these points do not determine it, so the fit is a "
                       "boundary solution and its predictions deserve caution (more or larger model sizes help)"]
    assert main(["fit", "--data", data, "--bootstrap", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["at_bound"] == ["E"]
    assert main(["fit", "--data", _csv(tmp_path, _planted(0.7)), "--bootstrap", "0"]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]


def test_predictions_beyond_the_data_p_are_flagged(tmp_path, capsys):
    data = _csv(tmp_path, _planted(0.7))
    assert main(["fit", "--data", data, "--bootstrap", "0", "--json", "--predict", "1e9,8", "1e9,2",
                 "--need-params", "1.5,16", "--need-streams", "1.2,1e9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["P_range"] == [1.0, 4.0]
    assert [q["beyond_data_P"] for q in out["predictions"]] == [True, False]  # 8 > 4 = the data's largest P
    assert out["need_params"][0]["beyond_data_P"] is True
    needed = out["need_streams"][0]["P"]
    assert out["need_streams"][0]["beyond_data_P"] is (needed > 4.0)
    assert main(["fit", "--data", data, "--bootstrap", "0", "--predict", "1e9,8", "1e9,2"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().splitlines()[-1] == ("warning: P = 8 lies beyond the P range of the data (1 to 4): "
                                              "the law is extrapolated in P there")
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith(("8 ", "2 "))
            and "1.000B" in line}
    assert rows["8"].endswith(" *") and not rows["2"].endswith("*")
    assert "8       " in text and "* beyond the P range of the data (1 to 4): extrapolated" in text


def test_no_warning_inside_the_data():
    res = L.fit(N, P, _planted(0.7))
    assert not res.beyond_data_p(1) and not res.beyond_data_p(3) and res.beyond_data_p(4.5)
