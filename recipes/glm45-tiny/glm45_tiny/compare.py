"""Controlled training experiments behind the issue's claims: Muon vs AdamW, and loss-free balancing vs none.

Both use the same small GLM-4.5-architecture model, the same synthetic conversations in the same order and
the same number of tokens per step; only the optimizer (with its own tuned learning rate) or the balancing
rate γ changes.

- `optimizers`: each optimizer runs at every learning rate of its grid; the best run of each (lowest final
  held-out loss) is compared: at which step does Muon first reach AdamW's final held-out loss?
- `balance`: the best Muon setting with γ = 1e-3 (DeepSeek-V3's rate, meant for very long runs), γ = 1e-2 and
  γ = 0: the max/mean expert load of every MoE layer over the last logging window.

    python -m glm45_tiny.compare --out runs/compare --tokenizer runs/glm45-tiny/tokenizer
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from glm45.train.config import TrainConfig
from glm45.train.trainer import train
from glm45_tiny.plot import plot, read_metrics
from glm45_tiny.synthetic import generate, write_jsonl

logger = logging.getLogger(__name__)

SMALL_MODEL = {
    "hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "use_qk_norm": True,
    "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 0, "rope_theta": 10000.0,
}


def run(out: Path, name: str, common: dict, **overrides) -> Path:
    folder = out / name
    if (folder / "summary.json").is_file():  # finished before: reuse
        return folder / "metrics.jsonl"
    train(TrainConfig(output_dir=str(folder), **{**common, **overrides}))
    return folder / "metrics.jsonl"


def final_eval(metrics: Path) -> float:
    return read_metrics(metrics)[1][-1]["eval_lm_loss"]


def first_step_reaching(metrics: Path, target: float) -> int | None:
    for record in read_metrics(metrics)[1]:
        if record["eval_lm_loss"] <= target:
            return record["step"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Muon vs AdamW and balancing vs none, on one small run.")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--balance-steps", type=int, default=300)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--gammas", type=float, nargs="+", default=[1e-3, 1e-2, 0.0])
    parser.add_argument("--experiments", nargs="+", default=["optimizers", "balance"])
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(generate(4000, seed=10), out / "train.jsonl")
    held_out = write_jsonl(generate(60, seed=11, split="heldout"), out / "eval.jsonl")
    (out / "model.json").write_text(json.dumps(SMALL_MODEL))
    common = dict(data=str(data), eval_data=str(held_out), init_config=str(out / "model.json"),
                  tokenizer=args.tokenizer, batch_tokens=args.batch_tokens, max_steps=args.steps, warmup_steps=20,
                  eval_every=10, log_every=10, save_every=10**6, mtp_weight=0.0, threads=1, seed=0)
    report: dict = {}
    best_muon_lr = args.muon_lrs[len(args.muon_lrs) // 2]
    if "optimizers" in args.experiments:
        results = {}
        for optimizer, lrs in (("muon", args.muon_lrs), ("adamw", args.adamw_lrs)):
            for lr in lrs:
                metrics = run(out, f"{optimizer}-lr{lr:g}", common, optimizer=optimizer, lr=lr)
                results[(optimizer, lr)] = (metrics, final_eval(metrics))
        best = {opt: min(((lr, m, loss) for (o, lr), (m, loss) in results.items() if o == opt), key=lambda x: x[2])
                for opt in ("muon", "adamw")}
        best_muon_lr = best["muon"][0]
        target = best["adamw"][2]
        reached = first_step_reaching(best["muon"][1], target)
        report["optimizers"] = {
            "final_eval_loss": {f"{o}-lr{lr:g}": round(loss, 4) for (o, lr), (_, loss) in results.items()},
            "best": {opt: {"lr": lr, "final_eval_loss": round(loss, 4)} for opt, (lr, _, loss) in best.items()},
            "muon_steps_to_adamw_final_loss": reached, "steps": args.steps,
            "ratio": None if reached is None else round(reached / args.steps, 3),
        }
        report["optimizers"]["plot"] = str(plot(
            [str(best["muon"][1]), str(best["adamw"][1])],
            [f"Muon lr={best['muon'][0]:g}", f"AdamW lr={best['adamw'][0]:g}"],
            out / "muon_vs_adamw.png", "Muon vs AdamW (best learning rate of each)"))
    if "balance" in args.experiments:
        loads = {}
        paths = []
        for gamma in args.gammas:
            metrics = run(out, f"balance-gamma{gamma:g}", common, optimizer="muon", lr=best_muon_lr,
                          balance_gamma=gamma, max_steps=args.balance_steps)
            loads[f"gamma={gamma:g}"] = read_metrics(metrics)[0][-1]["expert_load_max_over_mean"]
            paths.append(str(metrics))
        report["balance"] = {"final_window_max_over_mean": loads, "steps": args.balance_steps,
                             "plot": str(plot(paths, [f"γ={g:g}" for g in args.gammas], out / "balance.png",
                                              "loss-free balancing"))}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
