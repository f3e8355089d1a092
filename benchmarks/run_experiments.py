"""Experiments 1-3 on the tiny default, one command: train every run (one thread each, --jobs at a time), then
`analysis.py report` on them.

    python benchmarks/run_experiments.py --exp 1 2 3 --jobs 2     # the whole set on 2 cores
    python benchmarks/run_experiments.py --exp 1                  # modes x seeds 1 2 3, then the report
    python benchmarks/run_experiments.py --exp 2 --seeds 1 2 3    # routers of joint_moe against the specialists
    python benchmarks/run_experiments.py --exp 3                  # freeze (knowledge-transfer) variants
    python benchmarks/run_experiments.py --exp 1 --smoke          # 2 steps per run, a small report: checks wiring
    python benchmarks/run_experiments.py --exp 1 --dry-run        # print the commands only

Experiment 1 (interference): the seven modes of configs/tiny_<mode>.yaml.
Experiment 2 (routers): joint_moe with each router of configs/tiny_exp2_<router>.yaml, next to the emb_only / rank_only
specialists; analysis.py groups runs by (mode, seed), so each router gets its own report against the specialists.
Experiment 3 (transfer): joint_moe trained one task after the other, the first task's and the shared experts
frozen for the second (configs/tiny_transfer_*.yaml), each reported against the specialists the same way.

Experiments 2 and 3 reuse Experiment 1's specialist runs (<out>/exp1/{emb_only,rank_only}_s<seed>: the same
configs and seeds), training them first if missing.

The runs and reports are grid.py's (grid.run_grid): runs go to <out>/exp<N>/<name>_s<seed>, their output to
<out>/logs/exp<N>/<name>_s<seed>.log; a finished run is skipped and a killed one resumed, so an interrupted set is
restarted by the same command; a failed run is reported with its log and the others go on. Reports go to
<out>/exp<N>_report[/<variant>] (report.md and runs.md, every run's last dev evaluation). Every reranking row
reranks the same fixed list: the subword-BM25 dev candidates each run writes (evaluate.dev_candidates).
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import grid  # noqa: E402

MODES = ["emb_only", "rank_only", "joint_single", "joint_moe", "hard_switch", "hard_switch_shared", "no_shared"]
SPECIALISTS = ["emb_only", "rank_only"]
# Experiment 2: the router configs configs/tiny_exp2_<router>.yaml (the router catalogue of README), trained as
# long as the Experiment-1 configs.
ROUTERS = ["softmax", "topk", "sparsemax", "entmax15", "dynmole", "ldmole", "retriever"]
EXP_STEPS = ["--train.steps=600"]  # configs/tiny_<mode>.yaml's steps; tiny_exp2_*.yaml build on tiny.yaml's 300
# Experiment 3: name -> config file under configs/.
TRANSFER = {
    "embed_then_rerank": "tiny_transfer_embed_then_rerank.yaml",
    "rerank_then_embed": "tiny_transfer_rerank_then_embed.yaml",
}
SMOKE = ["--train.steps=2", "--train.warmup_steps=1", "--train.eval_every=2", "--train.save_every=2",
         "--data.dev_queries=8"]
SMOKE_REPORT = ["--resamples", "200", "--batches", "1", "--n", "4", "--no-base-probe"]


def smoke_stages(name: str) -> list:
    """Two 1-step stages in the variant's order and with its frozen experts (the smoke version of its stages)."""
    first, second, frozen = ("embed", "rerank", "[embed, shared]") if "embed_then" in name else \
        ("rerank", "embed", "[rerank, shared]")
    return [f"--train.stages=[{{steps: 1, tasks: {first}}}, {{steps: 1, tasks: {second}, freeze_experts: {frozen}}}]"]


def experiments(exps: list, smoke: bool) -> tuple:
    """-> ([grid.Kind], {report group: [kind names]}) of the experiments: Experiment 1's seven modes in one report;
    each router (2) and transfer variant (3) in its own report with Experiment 1's specialists (trained once)."""
    cfg = lambda name: os.path.join(REPO, "configs", f"tiny_{name}.yaml")  # noqa: E731
    kinds, groups = {}, {}

    def add(name, config, overrides=()):
        kinds.setdefault(name, grid.Kind(name, config, list(overrides)))
        return name

    spec = lambda: [add(f"exp1/{m}", cfg(m)) for m in SPECIALISTS]  # noqa: E731
    for exp in exps:
        if exp == 1:
            groups["exp1_report"] = [add(f"exp1/{m}", cfg(m)) for m in MODES]
        elif exp == 2:
            for r in ROUTERS:
                groups[f"exp2_report/joint_moe_{r}"] = spec() + [add(f"exp2/joint_moe_{r}", cfg(f"exp2_{r}"),
                                                                     EXP_STEPS)]
        else:
            for n, f in TRANSFER.items():
                extra = smoke_stages(n) if smoke else []
                groups[f"exp3_report/transfer_{n}"] = spec() + [add(f"exp3/transfer_{n}",
                                                                    os.path.join(REPO, "configs", f), extra)]
    return list(kinds.values()), groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", type=int, nargs="+", required=True, choices=[1, 2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time, one thread each (2 on 2 cores)")
    p.add_argument("--out", default="ckpt", help="runs go to <out>/exp<N>/, reports to <out>/exp<N>_report/")
    p.add_argument("--smoke", action="store_true", help="2 training steps per run and a small report")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    if len(a.seeds) < 2:
        raise SystemExit("--seeds: the report's bootstrap needs at least 2 seeds (3 or more recommended)")
    if a.jobs < 1:
        raise SystemExit(f"--jobs: expected at least 1, got {a.jobs}")
    kinds, groups = experiments(sorted(set(a.exp)), a.smoke)
    g = grid.Grid(out=a.out, seeds=a.seeds, jobs=a.jobs, threads=1, common=SMOKE if a.smoke else [],
                  report=grid.ReportSection(out=a.out, groups=groups, args=SMOKE_REPORT if a.smoke else []))
    return grid.run_grid(g, "run_experiments.py", kinds=kinds, dry_run=a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
