"""The serving-cost model: memory and latency of P streams against parameter scaling.

Lives here: `roofline` (model shapes, workloads and the memory/latency estimate),
`hardware` (accelerator profiles, and the measured profile of this CPU), `compare` (streams
against the parameter count of equal benefit, from the law), `measure` (time and memory of
real decoding, checked against the estimate) and `plot`.

Stands alone at import: numpy only; `measure` imports torch inside its functions, and
`compare` uses `parscale.law`.
"""
