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

Runs go to <out>/exp<N>/<name>_s<seed>; a run directory that already holds a checkpoint is continued with
--resume (a finished run then only re-reads its state), so an interrupted grid is restarted by the same command.
Reports go to <out>/exp<N>_report[/<variant>]. Every reranking row reranks the same fixed list: the subword-BM25
dev candidates each run writes (evaluate.dev_candidates), passed to the report as --candidates.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

def smoke_stages(name: str) -> list:
    """Two 1-step stages in the variant's order and with its frozen experts (the smoke version of its stages)."""
    first, second, frozen = ("embed", "rerank", "[embed, shared]") if "embed_then" in name else \
        ("rerank", "embed", "[rerank, shared]")
    return [f"--train.stages=[{{steps: 1, tasks: {first}}}, {{steps: 1, tasks: {second}, freeze_experts: {frozen}}}]"]


def runs_for(exp: int) -> list:
    """-> [(name, config file, overrides)] of one experiment (without seeds)."""
    cfg = lambda mode: os.path.join(REPO, "configs", f"tiny_{mode}.yaml")  # noqa: E731
    if exp == 1:
        return [(m, cfg(m), []) for m in MODES]
    if exp == 2:
        return [(m, cfg(m), []) for m in SPECIALISTS] + [(f"joint_moe_{r}", cfg(f"exp2_{r}"), EXP_STEPS)
                                                         for r in ROUTERS]
    if exp == 3:
        return [(m, cfg(m), []) for m in SPECIALISTS] + [(f"transfer_{n}", os.path.join(REPO, "configs", f), [])
                                                         for n, f in TRANSFER.items()]
    raise SystemExit(f"--exp: expected 1, 2 or 3, got {exp}")


def reports_for(exp: int, run_dirs: dict) -> list:
    """-> [(report name, [run dirs])]: one report for Experiment 1, one per variant (with the specialists) else."""
    if exp == 1:
        return [("", [d for ds in run_dirs.values() for d in ds])]
    spec = [d for m in SPECIALISTS for d in run_dirs[m]]
    return [(name, spec + dirs) for name, dirs in run_dirs.items() if name not in SPECIALISTS]


def run(cmd: list, dry: bool, env: dict, log: str = None) -> None:
    """Run one command (its output to `log` if given, else inherited); a failure stops the grid."""
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if dry:
        return
    t0, last = time.time(), ""
    if log is None:
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
    else:
        with open(log, "w") as f:
            r = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise SystemExit(f"failed (exit {r.returncode}): {' '.join(cmd)}; its output: {log}")
        with open(log) as f:
            last = next((x for x in reversed(f.read().splitlines()) if x.startswith("done: ")), "")
    print(f"  ({time.time() - t0:.0f} s) {last}".rstrip(), flush=True)


def train_commands(exp: int, seeds: list, out: str, smoke: bool) -> tuple:
    """-> ([(out_dir, command)] still to train or to re-read, {run name: [run dirs]}) of one experiment."""
    py = sys.executable
    run_dirs, cmds = {}, []
    for name, config, overrides in runs_for(exp):
        for seed in seeds:
            exp_dir = 1 if name in SPECIALISTS else exp  # the specialists are Experiment 1's runs
            out_dir = os.path.join(out, f"exp{exp_dir}", f"{name}_s{seed}")
            run_dirs.setdefault(name, []).append(out_dir)
            cmd = [py, "train.py", config, f"--train.seed={seed}", f"--train.out_dir={out_dir}"] + overrides
            if smoke:
                cmd += SMOKE + (smoke_stages(name) if "_then_" in name else [])
            if os.path.isfile(os.path.join(REPO, out_dir, "latest")) or os.path.isfile(os.path.join(out_dir, "latest")):
                cmd.append("--resume")
            cmds.append((out_dir, cmd))
    return cmds, run_dirs


def runs_table(run_dirs: dict) -> str:
    """Markdown: each run's last dev evaluation (metrics.jsonl), fixed-list reranking next to the list's own order."""
    rows = ["| run | seed | step | retrieval | rerank fixed | list | fixed - list | two-stage |",
            "|---|---|---|---|---|---|---|---|"]
    for name, dirs in run_dirs.items():
        for d in dirs:
            path = os.path.join(d if os.path.isabs(d) else os.path.join(REPO, d), "metrics.jsonl")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                m = json.loads(f.read().splitlines()[-1])
            seed = d.rsplit("_s", 1)[-1]
            rows.append(f"| {name} | {seed} | {m['step']} | {m['emb_ndcg@10']:.3f} | {m['fixed_ndcg@10']:.3f} | "
                        f"{m['cand_ndcg@10']:.3f} | {m['fixed_ndcg@10'] - m['cand_ndcg@10']:+.3f} | "
                        f"{m['rerank_ndcg@10']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    plans = {exp: train_commands(exp, a.seeds, a.out, a.smoke) for exp in sorted(set(a.exp))}
    todo, seen = [], set()
    for cmds, _ in plans.values():
        todo += [(d, c) for d, c in cmds if d not in seen and not seen.add(d)]  # a shared specialist trains once
    if a.dry_run or a.jobs == 1:
        for _, cmd in todo:
            run(cmd, a.dry_run, env)
    else:
        with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
            logs = [d + ".log" for d, _ in todo]
            for d in {os.path.dirname(x) for x in logs}:
                os.makedirs(d, exist_ok=True)
            list(pool.map(lambda dc, log: run(dc[1], False, env, log), todo, logs))
    t_train = time.time() - t0
    py = sys.executable
    for exp, (_, run_dirs) in plans.items():
        if not a.dry_run:
            table = runs_table(run_dirs)
            os.makedirs(os.path.join(a.out, f"exp{exp}_report"), exist_ok=True)
            with open(os.path.join(a.out, f"exp{exp}_report", "runs.md"), "w") as f:
                f.write(table + "\n")
            print(f"experiment {exp}, last dev evaluation of each run:\n{table}", flush=True)
        for name, dirs in reports_for(exp, run_dirs):
            report_dir = os.path.join(a.out, f"exp{exp}_report", name) if name else os.path.join(a.out, f"exp{exp}_report")
            cmd = [py, "analysis.py", "report", *dirs, "--out", report_dir,
                   "--candidates", os.path.join(dirs[0], "dev_candidates.trec")]
            if a.smoke:
                cmd += ["--resamples", "200", "--batches", "1", "--n", "4", "--no-base-probe"]
            run(cmd, a.dry_run, env)
    print(f"experiments {' '.join(map(str, plans))}: {len(todo)} trainings in {t_train:.0f} s, with the reports "
          f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
