"""The demo: the end-to-end mini-study behind `make demo`.

Lives here: `study` (orchestration: which runs, in which order, reused when finished) and
`report` (tables, plots, report.md and summary.json).

May import everything; nothing imports it but the CLI.
"""
