"""The demo: the end-to-end mini-study behind `make demo`.

Lives here, top down: `study` (orchestration: trains, measures and reports the runs), `runner`
(the runs in worker processes, reused when finished), `measure` (what is read off a run),
`law_report` (the `law` budget's report.md, premise first), `report` and `plots` (tables,
report.md, summary.json and the plots), `stats` (paired statistics over seeds and the law's
premise check, for study and report alike) and `plan` (the budgets and the runs).

May import everything; nothing imports it but the CLI.
"""
