"""Hyperparameter sweeps: a sweep config (space.py), Ray Tune over Ray Train trials (sweep.py), the sweep's MLflow
parent run with its table and figures (report.py)."""
