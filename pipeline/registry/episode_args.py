"""The command-line flags every figure job (jobs.generate, jobs.inspect) shares: which model, which episode.
Kept apart from the figures themselves so that --help and bad flags answer before torch is imported."""
from __future__ import annotations

import argparse


def add_episode_arguments(ap: argparse.ArgumentParser) -> None:
    """--model and which episode to draw: the same flags for every figure job."""
    ap.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--episode", default="", help="prepared dataset URL (or .npy file) holding the episode")
    which.add_argument("--random", action="store_true", help="a random test episode of the version's own data")
    ap.add_argument("--index", type=int, default=0, help="which fixed test episode of --episode (default 0)")
