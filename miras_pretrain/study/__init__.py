"""``miras-pretrain study``: several models trained on one data set and token budget, evaluated
and compared (docs/study.md).

config.py (the study file's schema), plan.py (runs x seeds -> training configs), runner.py (local
runs, N at a time, resumable), evaluate.py (per-run measurements), collect.py (results.json/md),
plots.py (PNGs), slurm.py (one job array through the launcher), cli.py (the subcommand).
"""
