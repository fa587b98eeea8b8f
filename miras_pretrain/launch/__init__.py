"""Launching training runs on clusters: SLURM batch scripts (render.py) and their CLI (cli.py)."""
