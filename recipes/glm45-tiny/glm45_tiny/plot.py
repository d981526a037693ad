"""Loss curves from training metrics: `metrics.jsonl` files → one PNG.

Each run's training loss (thin) and held-out loss (markers) are drawn against the step, one colour per run,
with the expert-load balance (max/mean per router) in a second panel when the runs logged it.

    python -m glm45_tiny.plot runs/a/metrics.jsonl runs/b/metrics.jsonl --labels Muon AdamW --out loss.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of one metrics.jsonl."""
    train, evaluation = [], []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}: not a JSON line: {e}") from e
        if "eval_lm_loss" in record:
            evaluation.append(record)
        elif "lm" in record:
            train.append(record)
    return train, evaluation


def plot(paths: list[str], labels: list[str] | None, out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} metrics files; give one label per file")
    runs = [(labels[i] if labels else Path(p).parent.name, *read_metrics(p)) for i, p in enumerate(paths)]
    with_loads = any(r.get("expert_load_max_over_mean") for _, train, _ in runs for r in train)
    fig, axes = plt.subplots(1, 2 if with_loads else 1, figsize=(12 if with_loads else 7, 4.5), squeeze=False)
    loss_ax = axes[0][0]
    for i, (label, train, evaluation) in enumerate(runs):
        colour = f"C{i}"
        if train:
            loss_ax.plot([r["step"] for r in train], [r["lm"] for r in train], color=colour, alpha=0.45,
                         linewidth=1, label=f"{label} train")
        if evaluation:
            loss_ax.plot([r["step"] for r in evaluation], [r["eval_lm_loss"] for r in evaluation], "o-",
                         color=colour, markersize=3, label=f"{label} held-out")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("cross-entropy (assistant tokens)")
    loss_ax.set_yscale("log")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    loss_ax.set_title(title or "loss")
    if with_loads:
        load_ax = axes[0][1]
        for i, (label, train, _) in enumerate(runs):
            steps = [r["step"] for r in train if r.get("expert_load_max_over_mean")]
            worst = [max(r["expert_load_max_over_mean"].values()) for r in train if r.get("expert_load_max_over_mean")]
            load_ax.plot(steps, worst, color=f"C{i}", label=f"{label}: worst layer")
        load_ax.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="1.5")
        load_ax.set_xlabel("step")
        load_ax.set_ylabel("expert load max/mean")
        load_ax.grid(alpha=0.3)
        load_ax.legend(fontsize=8)
        load_ax.set_title("MoE balance")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot training/held-out loss from metrics.jsonl files.")
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files written by glm45 train")
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--title", default="")
    parser.add_argument("--out", default="loss.png")
    args = parser.parse_args(argv)
    print(plot(args.metrics, args.labels, args.out, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
