"""The heterogeneity benchmark behind `scripts/bench_methods.py` (issue 13, part 4).

- `spec`: scenarios (the capacity ladder), tasks, methods, and the FederatedTune each run gets;
- `results`: what one run's report.json says (per client), and the resumable results file;
- `analysis`: tables, paired differences, the per-client table, the issue's targets, the docs block;
- `plots`: the PNG figures (matplotlib, Agg).

Only `plots` needs more than the standard library and PyYAML, and only when it draws.
"""
