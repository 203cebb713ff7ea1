"""ParScale against parameter scaling of equal benefit: what each costs over a base model.

For each P, a loss reference gives the ParScale model's loss; the P = 1 model with the
same loss is the parameter-scaling alternative. Its cost comes from the paper's six-size
ladder (interpolated linearly between the two sizes that bracket it, in loss for the
observed reference as the paper does, in N for the law), or, for a base model that is
not on the ladder, from widening the base (hidden and intermediate scaled together,
layers and heads kept) until it has the equivalent parameter count.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from parscale.cost.roofline import PRESETS, CostResult, ModelShape, Workload, estimate, non_embedding_params
from parscale.errors import UserError
from parscale.cost.hardware import Hardware
from parscale.law.fitting import Law, fit, load_law
from parscale.law.points import PAPER_DATASETS, load_points

LADDER = list(PRESETS.values())
# How the cost of the equal-loss P = 1 model was found (a row's `method`), in words.
METHOD_NOTES = {
    "ladder, interpolated in loss": "interpolated linearly in loss between the two of the paper's six sizes "
                                    "whose observed P = 1 losses bracket the ParScale loss",
    "ladder, interpolated in N": "interpolated linearly in N between the two of the paper's six sizes that "
                                 "bracket N equiv",
    "base widened to N'": "the base model widened (hidden and intermediate size scaled together) to N equiv "
                          "parameters",
}


def load_paper_rows(name: str) -> list[tuple[int, int, float]]:
    """(params, P, loss) rows of the paper's measurements shipped as package data."""
    if name not in PAPER_DATASETS:
        raise UserError(f"unknown data set {name!r}; choose one of {sorted(PAPER_DATASETS)}")
    points = load_points(name)
    return [(int(n), int(p), float(y)) for n, p, y in zip(points.params, points.streams, points.loss)]


def fitted_law(name: str) -> Law:
    """The law fitted to one of the paper's data sets with `parscale.law.fitting.fit`."""
    points = load_points(name)
    return fit(points.params, points.streams, points.loss).law


@dataclass(frozen=True)
class Reference:
    """Where losses come from: observed ladder losses (keyed by (ladder index, P)) or a law."""

    name: str
    law: Law | None = None
    observed: dict[tuple[int, int], float] | None = None


def parse_reference(spec: str, law_file: str | None = None, law_fitter: Callable[[str], Law] = fitted_law) -> Reference:
    """`observed:paper-stack`, `law:paper-stack` (fitted) or, with `law_file`, that law."""
    if law_file:
        return Reference(f"law:{law_file}", law=load_law(law_file))
    kind, _, data = spec.partition(":")
    if kind not in ("observed", "law") or data not in PAPER_DATASETS:
        raise UserError(f"unknown reference {spec!r}; use observed:paper-stack, law:paper-stack (or -pile), or --law FILE.json")
    if kind == "law":
        return Reference(spec, law=law_fitter(data))
    by_params = {(n, p): loss for n, p, loss in load_paper_rows(data)}
    observed = {}
    for i, shape in enumerate(LADDER):
        for p in (1, 2, 4, 8):
            n = non_embedding_params(shape, p)
            if (n, p) not in by_params:
                raise UserError(f"{data} has no loss for N={n}, P={p}; the package data looks damaged")
            observed[(i, p)] = by_params[(n, p)]
    return Reference(spec, observed=observed)


def ladder_index(shape: ModelShape) -> int | None:
    """Which of the paper's sizes this is (None if it is not one of them)."""
    matches = [i for i, s in enumerate(LADDER) if replace(s, tied_embeddings=shape.tied_embeddings) == shape]
    return matches[0] if matches else None


@dataclass(frozen=True)
class Costs:
    memory_gib: float
    latency_s: float

    def lerp(self, other: "Costs", frac: float) -> "Costs":
        return Costs(self.memory_gib + frac * (other.memory_gib - self.memory_gib),
                     self.latency_s + frac * (other.latency_s - self.latency_s))


def _bracket(values: list[float], target: float, decreasing: bool) -> tuple[int, float, bool]:
    """Index i and fraction f with target = v[i] + f*(v[i+1]-v[i]); extrapolates at the ends."""
    for i in range(len(values) - 1):
        lo, hi = values[i], values[i + 1]
        inside = hi <= target <= lo if decreasing else lo <= target <= hi
        if inside:
            return i, (target - lo) / (hi - lo), False
    past_first = target > values[0] if decreasing else target < values[0]  # beyond the first end
    i = 0 if past_first else len(values) - 2  # else beyond the last: extend the last pair
    return i, (target - values[i]) / (values[i + 1] - values[i]), True


class Comparator:
    """Averages costs over lengths (input = output, as in the paper's Figure 4) and caches them."""

    def __init__(self, hw: Hardware, lengths: list[int], workload: Workload) -> None:
        if not lengths or any(not isinstance(x, int) or x <= 0 for x in lengths):
            raise UserError(f"lengths must be positive integers, got {lengths}")
        self.hw, self.lengths, self.workload = hw, lengths, workload
        self._cache: dict[tuple[ModelShape, int, int], Costs] = {}

    def costs(self, shape: ModelShape, p: int, batch: int) -> Costs:
        key = (shape, p, batch)
        if key not in self._cache:
            runs: list[CostResult] = [
                estimate(shape, replace(self.workload, n_streams=p, batch_size=batch, input_length=n, output_length=n), self.hw)
                for n in self.lengths
            ]
            self._cache[key] = Costs(sum(r.memory_gib for r in runs) / len(runs), sum(r.latency_s for r in runs) / len(runs))
        return self._cache[key]

    def ladder_costs(self, shape: ModelShape, batch: int) -> list[Costs]:
        tied = [replace(s, tied_embeddings=shape.tied_embeddings) for s in LADDER]
        return [self.costs(s, 1, batch) for s in tied]

    def widened_costs(self, base: ModelShape, n_target: float, batch: int) -> tuple[Costs, bool]:
        """Cost of the base widened to n_target non-embedding params (hidden a multiple of heads)."""
        step = base.heads

        def widened(hidden: int) -> ModelShape:
            inter = max(1, round(base.intermediate * hidden / base.hidden))
            return replace(base, hidden=hidden, intermediate=inter)

        hidden = base.hidden
        while non_embedding_params(widened(hidden + step)) <= n_target:
            hidden += step
        lo, hi = widened(hidden), widened(hidden + step)
        n_lo, n_hi = non_embedding_params(lo), non_embedding_params(hi)
        frac = (n_target - n_lo) / (n_hi - n_lo)
        return self.costs(lo, 1, batch).lerp(self.costs(hi, 1, batch), frac), n_target < non_embedding_params(base)


def compare_one(cmp: Comparator, base: ModelShape, ref: Reference, p: int, batch: int) -> dict[str, Any]:
    """One (P, batch) row: losses, the equivalent model, costs, increases and ratios."""
    index = ladder_index(base)
    n_base, n_par = non_embedding_params(base, 1), non_embedding_params(base, p, cmp.workload.prefix_tokens)
    if ref.observed is not None:
        if index is None:
            raise UserError("observed losses exist only for the paper's six sizes; use --preset or the law reference")
        loss_base, loss_par = ref.observed[(index, 1)], ref.observed[(index, p)]
        ladder_losses = [ref.observed[(i, 1)] for i in range(len(LADDER))]
        i, frac, extrapolated = _bracket(ladder_losses, loss_par, decreasing=True)
        costs = cmp.ladder_costs(base, batch)
        param = costs[i].lerp(costs[i + 1], frac)
        ns = [non_embedding_params(s) for s in LADDER]
        n_equiv, method = ns[i] + frac * (ns[i + 1] - ns[i]), "ladder, interpolated in loss"
    else:
        law = ref.law
        loss_base, loss_par = law.loss(n_base, 1), law.loss(n_par, p)
        n_equiv = n_par * law.multiplier(p)
        ns = [non_embedding_params(s) for s in LADDER]
        if index is not None and ns[0] <= n_equiv <= ns[-1]:
            i, frac, extrapolated = _bracket(ns, n_equiv, decreasing=False)
            costs = cmp.ladder_costs(base, batch)
            param, method = costs[i].lerp(costs[i + 1], frac), "ladder, interpolated in N"
        else:
            param, extrapolated = cmp.widened_costs(base, n_equiv, batch)
            method = "base widened to N'"
    b0, par = cmp.costs(base, 1, batch), cmp.costs(base, p, batch)
    row = {
        "P": p, "batch_size": batch, "reference": ref.name, "method": method, "extrapolated": extrapolated,
        "params_base": n_base, "params_parscale": n_par, "params_equivalent": n_equiv,
        "loss_base": loss_base, "loss_parscale": loss_par,
        "memory_gib_base": b0.memory_gib, "memory_gib_parscale": par.memory_gib, "memory_gib_param": param.memory_gib,
        "latency_s_base": b0.latency_s, "latency_s_parscale": par.latency_s, "latency_s_param": param.latency_s,
    }
    row["memory_increase_parscale_gib"] = par.memory_gib - b0.memory_gib
    row["memory_increase_param_gib"] = param.memory_gib - b0.memory_gib
    row["latency_increase_parscale_s"] = par.latency_s - b0.latency_s
    row["latency_increase_param_s"] = param.latency_s - b0.latency_s
    row["memory_ratio"] = _ratio(row["memory_increase_param_gib"], row["memory_increase_parscale_gib"])
    row["latency_ratio"] = _ratio(row["latency_increase_param_s"], row["latency_increase_parscale_s"])
    return row


def _ratio(param: float, parscale: float) -> float:
    return param / parscale if parscale > 0 else float("inf")


def against_parameters(param: float, parscale: float, what: str) -> str:
    """ParScale's increase against parameter scaling's in words: '53.6x less memory', or
    '1.04x more latency' where ParScale adds more: the word follows the sign, the factor is >= 1."""
    if parscale <= 0:
        return f"no added {what}" if param > 0 else f"no added {what} either way"
    if param <= 0:
        return f"more {what} (parameter scaling adds none)"
    ratio = param / parscale
    word, factor = ("less", ratio) if ratio >= 1 else ("more", 1.0 / ratio)
    shown = f"{factor:.0f}" if factor >= 100 else f"{factor:#.3g}"  # three digits: 53.6, 9.90, 1.04
    return f"{shown}x {word} {what}"


def compare(base: ModelShape, ref: Reference, streams: list[int], batches: list[int], cmp: Comparator) -> list[dict[str, Any]]:
    if any(p < 2 for p in streams):
        raise UserError(f"compare needs P >= 2 (P = 1 is the base itself), got {streams}")
    return [compare_one(cmp, base, ref, p, b) for b in batches for p in streams]
