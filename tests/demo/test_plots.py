"""The demo's loss-vs-P plot: its legend has an entry, with the right marker, for every kind drawn."""
from __future__ import annotations

from parscale.demo import plots


def test_loss_vs_p_legend_shows_every_kind_with_its_marker(tmp_path, monkeypatch):
    runs = [{"group": "scratch", "kind": "p1" if p == 1 else "streams", "P": p, "seed": 0,
             "val_loss": 4.0 - 0.1 * p} for p in (1, 2, 4)]
    runs += [{"group": "scratch", "kind": "prefix", "P": 1, "seed": 0, "val_loss": 3.5},
             {"group": "scratch", "kind": "wide", "P": 1, "seed": 0, "val_loss": 4.1}]
    drawn = {}
    monkeypatch.setattr(plots, "atomic_save_figure", lambda fig, path, **kw: drawn.setdefault("fig", fig))
    plots.plot_loss_vs_p({"runs": runs}, tmp_path / "p.png")
    legend = drawn["fig"].axes[0].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == len(set(texts)) == 4  # P = 1, the streams, the control, the wider model
    by_kind = {kind: legend.legend_handles[texts.index(label)] for kind, label in plots.LEGEND.items()}
    for kind in plots.STYLE:
        handle = by_kind[kind]  # the legend's marker is the one its points were drawn with
        drawn_with = [c for c in drawn["fig"].axes[0].collections if c.get_label() == plots.LEGEND[kind]]
        assert drawn_with and handle.get_paths()[0].vertices.tolist() == drawn_with[0].get_paths()[0].vertices.tolist()
    assert "P=1" in plots.LEGEND["p1"]
