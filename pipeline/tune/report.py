"""What a sweep leaves behind: the results table (Parquet and CSV) and two labelled figures, on the parent run.

Rows are sorted by the sweep's metric (the validation chain bound by default). The table shows the three test bounds
side by side, named for what the memory that scores x_t holds: chain (the images before it: a proper bound on
-ln p(X)/T), leave-one-out (the other images), memory-conditional (x_t itself too: the paper's quantity, which a
memory that copies each image games), so a trial that wins only on the last is seen for what it is."""
from __future__ import annotations

import math
import pathlib
from typing import Any

from pipeline.tune.space import Sweep

VALID_COLUMNS = ("valid_chain_neg_elbo", "valid_neg_elbo")  # the last validation bounds: chain, memory-conditional
TEST_COLUMNS = ("test/chain_neg_elbo", "test/chain_iwae", "test/loo_neg_elbo", "test/loo_iwae", "test/neg_elbo",
                "test/iwae", "test/swap_gap", "test/kl_y", "test/kl_z")
SHOWN_BOUNDS = ("test/chain_neg_elbo", "test/loo_neg_elbo", "test/neg_elbo", "test/swap_gap")  # in the Markdown table


def outcome(metrics: dict[str, Any], error: Any) -> str:
    if error is not None:
        return "failed"
    return "finished" if "test/neg_elbo" in metrics else "stopped_by_asha"


def results_rows(sweep: Sweep, results) -> list[dict[str, Any]]:
    """One row per trial: its values, outcome, last step, the sweep's metric, bounds and KL_y per key; finished
    trials first, each group best first by the sweep's metric."""
    rows = []
    metric = sweep.cfg.metric
    for r in results:
        m = dict(r.metrics or {})
        row: dict[str, Any] = {"trial_id": m.get("trial_id", ""), **{k: (r.config or {}).get(k) for k in sweep.domains},
                               "outcome": outcome(m, r.error), "steps": m.get("step")}
        for col in dict.fromkeys((metric, *VALID_COLUMNS, *TEST_COLUMNS)):
            row[col] = m.get(col)
        for k in range(64):
            if f"test/kl_y_key{k}" not in m:
                break
            row[f"test/kl_y_key{k}"] = m[f"test/kl_y_key{k}"]
        rows.append(row)
    sign = 1.0 if sweep.cfg.mode == "min" else -1.0
    return sorted(rows, key=lambda row: (row["outcome"] != "finished", _num(row[metric], sign)))


def _num(v: Any, sign: float = 1.0) -> float:
    """sign * v for sorting, missing or non-finite values last (inf)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.inf
    return sign * x if math.isfinite(x) else math.inf


def write_table(rows: list[dict[str, Any]], folder: pathlib.Path) -> list[pathlib.Path]:
    import pandas as pd
    df = pd.DataFrame(rows)
    for c in df.columns:  # mixed search values (e.g. strings and numbers) must not break Parquet
        if df[c].dtype == object and c not in ("trial_id", "outcome"):
            df[c] = df[c].astype(str)
    parquet, csv = folder / "results.parquet", folder / "results.csv"
    df.to_parquet(parquet, index=False)
    df.to_csv(csv, index=False)
    return [parquet, csv]


def markdown_table(rows: list[dict[str, Any]], fields: list[str], metric: str = "valid_chain_neg_elbo") -> str:
    cols = list(dict.fromkeys(["trial_id", *fields, "outcome", "steps", metric, *VALID_COLUMNS, *SHOWN_BOUNDS]))
    keys = sorted({k for r in rows for k in r if k.startswith("test/kl_y_key")})

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}"
        return "-" if v is None else str(v)
    head = cols + (["KL_y per key"] if keys else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [fmt(r.get(c)) for c in cols]
        if keys:
            cells.append(" / ".join(fmt(r.get(k)) for k in keys))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LABELS = {"valid_chain_neg_elbo": "validation chain -ELBO", "valid_neg_elbo": "validation memory-conditional -ELBO"}


def _label(sweep: Sweep) -> str:
    """The sweep's metric in words, with its unit where it is a bound."""
    m = sweep.cfg.metric
    return f"{LABELS[m]} ({sweep.base.model.unit})" if m in LABELS else m


def _better(sweep: Sweep) -> str:
    return "lower is better" if sweep.cfg.mode == "min" else "higher is better"


def plot_hyperparameters(sweep: Sweep, rows: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
    """One panel per searched field: its value against the trial's last value of the sweep's metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fields = list(sweep.domains)
    fig, axes = plt.subplots(1, len(fields), figsize=(4.2 * len(fields), 3.6), squeeze=False)
    metric = sweep.cfg.metric
    for ax, field in zip(axes[0], fields):
        kind, _ = sweep.domains[field]
        for out, marker, label in (("finished", "o", "finished"), ("stopped_by_asha", "x", "stopped by ASHA"),
                                   ("failed", "s", "failed")):
            pts = [(r[field], _num(r[metric])) for r in rows if r["outcome"] == out
                   and math.isfinite(_num(r[metric]))]
            if pts:
                xs = [p[0] if isinstance(p[0], (int, float)) else str(p[0]) for p in pts]
                ax.scatter(xs, [p[1] for p in pts], marker=marker, label=label, s=40)
        numeric = [r[field] for r in rows if isinstance(r[field], (int, float)) and not isinstance(r[field], bool)]
        if kind == "loguniform" or (numeric and min(numeric) > 0 and max(numeric) / min(numeric) > 50):
            ax.set_xscale("log")  # values over orders of magnitude (learning rates)
        ax.set_xlabel(field)
        ax.set_ylabel(f"last {_label(sweep)}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep {sweep.cfg.name}: searched values against {metric} ({_better(sweep)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(sweep: Sweep, results, path: pathlib.Path) -> pathlib.Path:
    """The sweep's metric of every trial over steps, on one plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric = sweep.cfg.metric
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in results:
        df = r.metrics_dataframe
        if df is None or "step" not in df or metric not in df:
            continue
        df = df[["step", metric]].dropna()
        df = df[df[metric].map(lambda v: math.isfinite(float(v)))]
        values = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in (r.config or {}).items())
        tid = (r.metrics or {}).get("trial_id", "?")
        ax.plot(df["step"], df[metric], marker=".", label=f"{tid}: {values}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(_label(sweep))
    ax.set_title(f"sweep {sweep.cfg.name}: {metric} of each trial (ASHA-stopped trials end early)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
