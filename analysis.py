"""Analysis of UniMoER runs: task interference, gradient conflict, routing, representation geometry, a report.

    python analysis.py interference ckpt/exp1/*                     # TIR + paired bootstrap per unified mode
    python analysis.py interference ckpt/exp1/* --data DIR --split test --candidates DIR/bm25.trec
    python analysis.py interference ckpt/exp1/* --candidates auto   # all rerank emb_only's retrieval
    python analysis.py gradients ckpt/exp1/joint_moe_s1 --batches 8 # cos(grad L_emb, grad L_rank) per tensor
    python analysis.py routing ckpt/exp1/joint_moe_s1               # routing weights / entropy per task, layer
    python analysis.py geometry ckpt/exp1/*                         # CKA, expert spectra, principal angles
    python analysis.py report ckpt/exp1/* --out runs/analysis/report  # all of the above + PNG plots

Each subcommand writes <out>/<name>.json and <name>.md (default out: runs/analysis) and prints the markdown.
A checkpoint is a run directory (its latest checkpoint) or a checkpoint directory; its config.yaml gives
train.mode and train.seed. Without --data every run is evaluated on its own dev set, as training does.

Interference. Per task and dataset each configuration's metric is nDCG@10: retrieval for the embedding task;
for the reranking task, reranking a fixed candidate list when --candidates (a TREC run per --data) is given, so
every configuration reorders the same documents ('auto': the lowest-seed emb_only run's retrieval), else the
retrieve -> rerank (two-stage) figure, where each model reranks its own retrieval: rank_only then retrieves with
its reranking expert, untrained for embedding, so its two-stage figure mostly measures that first stage.
Specialists: emb_only for embedding, rank_only for reranking. For each unified mode (trains both tasks)

    TIR = (m_specialist - m_unified) / m_specialist      > 0: the unified model is worse (interference)

per seed: seed i of the mode against seed i of the specialist when both have the same seed set, else against
the specialist's mean over seeds; reported as mean and std (ddof 1) over seeds.
Significance: paired two-level bootstrap on D[i, q] = specialist - unified per-query nDCG@10 (seed i, query q;
the specialist's per-query mean over seeds when seeds do not pair). Each of B = 10000 resamples (numpy
default_rng(0)) draws S seed rows and Q query columns with replacement (the same queries for every drawn seed:
queries are paired across seeds) and takes the mean m_b. 95% CI: the 2.5 / 97.5 percentiles of m_b. Two-sided
p-value of "mean difference 0" from the null distribution m_b - m (the bootstrap shifted to mean 0):
p = (1 + #{b : |m_b - m| >= |m|}) / (1 + B). Identical systems give p = 1; a constant gain gives 1 / (1 + B).
With it, Almost Stochastic Order (measures.aso, Dror et al. 2019) on the two systems' per-seed mean nDCG@10, both
ways (eps_min of "specialist better" and of "unified better"), and Bonferroni over the datasets: with m datasets
a p counts as significant when p <= alpha / m, and ASO runs at confidence 1 - alpha / m (task_rows,
apply_bonferroni). --compare A:B makes the same tests of mode A against mode B on each task both train.

Gradients. For training batches (data.TrainSampler as train.py builds them, steps spread evenly over the run),
L_emb = alpha * info_nce_loss and L_rank = beta * bce_loss / group_ce_loss (losses.py, as training has them) on
separate backward passes, in eval mode (no dropout, no router jitter). Per layer and projection: cos(g_emb, g_rank) and
||g_emb|| / ||g_rank|| on each expert's [A_e, B_e] rank slots, each layer's router, and the frozen base weight
as a probe (requires_grad switched on for the analysis only). A tensor only one task reaches (cos undefined) is
not shared. Conflict fraction: batches with cos < 0 (PCGrad's criterion).

Routing: unimoer.routing_snapshot on dev texts (the first --n dev queries, each with its first relevant document);
over training from <run>/routing.jsonl. Geometry: linear CKA (Kornblith et al. 2019) of the last-token hidden
state per layer; singular values of each expert's delta s_e B_e A_e and principal angles between experts' column
spaces (left singular vectors of the deltas).
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np
import torch

import config
import data
import evaluate
import ir
import losses
import moe_lora
import train
import unimoer
from figures import (geometry_markdown, gradients_markdown, interference_markdown, plot_geometry, plot_gradients,
                     plot_interference, plot_routing, routing_markdown, significance_note)
from measures import (aso_both_ways, bonferroni, compare_to_specialist, effective_rank, expert_delta_svd,
                      gradient_cosine, linear_cka, mean_or_none, principal_angles, std_or_none)
from model import ArgumentParser, run_cli
from runs import total_steps

SPECIALIST = {"embed": "emb_only", "rerank": "rank_only"}
METRIC = "ndcg@10"
LINEAR_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)_proj$")


class AnalysisError(RuntimeError):
    """A request analysis.py cannot serve (mismatched arguments, matplotlib missing); main prints it alone."""


# ------------------------------------------------------------------------------------------------ runs and data
def run_info(path: str) -> dict:
    """A run or checkpoint directory -> {"path", "ckpt", "run_dir", "mode", "seed", "label", "cfg"}."""
    ckpt = unimoer.checkpoint_dir(path)
    cfg = config.load_run_config(os.path.join(ckpt, "config.yaml"))
    return {"path": path, "ckpt": ckpt, "run_dir": os.path.dirname(os.path.abspath(ckpt)), "mode": cfg.train.mode,
            "seed": cfg.train.seed, "label": f"{cfg.train.mode}_s{cfg.train.seed}", "cfg": cfg}


def load_runs(paths: Sequence[str]) -> list:
    """run_info of each path; runs are grouped by (mode, seed), so two runs with the same pair are an error."""
    runs, seen = [run_info(p) for p in paths], {}
    for r in runs:
        if r["label"] in seen:
            raise AnalysisError(f"{seen[r['label']]} and {r['path']} are both mode {r['mode']} seed {r['seed']}; "
                                "give one run per (mode, seed)")
        seen[r["label"]] = r["path"]
    return runs


def first_per_mode(runs: list) -> list:
    """One run per mode (the lowest seed): what the per-model analyses use in a report."""
    best = {}
    for r in runs:
        if r["mode"] not in best or r["seed"] < best[r["mode"]]["seed"]:
            best[r["mode"]] = r
    return sorted(best.values(), key=lambda r: config.MODES.index(r["mode"]))


def eval_set(cfg: config.Config, data_dir: Optional[str], split: Optional[str]) -> tuple:
    """-> (name, (corpus texts, queries, qrels)) as evaluate.evaluate_checkpoint picks them: the run's dev set as
    training cuts it (no data_dir, no split), else the whole split (default test) of data_dir (default data.dir)."""
    if data_dir is None and split is None:
        data_dir, split, dev = cfg.data.dir, cfg.data.dev_split, evaluate.load_dev(cfg)
    else:
        data_dir, split = data_dir or cfg.data.dir, split or "test"
        dev = evaluate.load_split(data_dir, split)
    return os.path.basename(os.path.normpath(data_dir)) + ("" if split == "test" else f"-{split}"), dev


def eval_texts(cfg: config.Config, data_dir: Optional[str], split: Optional[str], n: int) -> tuple:
    """-> (name, (queries, docs, pairs)): the first n judged queries, each with its first relevant document."""
    name, dev = eval_set(cfg, data_dir, split)
    return name, evaluate.dev_routing_texts(dev, n)


def per_query_metrics(run: dict, data_dir, split, candidates, **eval_kwargs) -> tuple:
    """evaluate.evaluate_checkpoint -> (dataset name, {"embed": {qid: nDCG@10}, "rerank": {qid: nDCG@10}}).

    It also writes <ckpt>/eval/<dataset>/ (metrics.json, per_query.json, run files); the E2Rank baseline stages
    are not needed here and are skipped unless eval_kwargs asks for them."""
    m = evaluate.evaluate_checkpoint(run["ckpt"], data_dir, split, candidates=candidates, progress=False,
                                     **{"e2rank": False, **eval_kwargs})
    pq = m["per_query"]
    return m["dataset"], {"embed": {q: v[METRIC] for q, v in pq["retrieval"].items()},
                          "rerank": {q: v[METRIC] for q, v in pq["rerank" if candidates else "two_stage"].items()}}


# ------------------------------------------------------------------------------------------------ interference
def specialist_candidates(runs: list, data_dir, split, **eval_kwargs) -> str:
    """--candidates auto: the retrieval run of the lowest-seed emb_only checkpoint (evaluate_checkpoint writes it
    to <ckpt>/eval/<dataset>/run.retrieval.trec), so every configuration reranks the embedding specialist's list."""
    spec = [r for r in first_per_mode(runs) if r["mode"] == SPECIALIST["embed"]]
    if not spec:
        raise AnalysisError("--candidates auto: needs an emb_only run among the checkpoints")
    m = evaluate.evaluate_checkpoint(spec[0]["ckpt"], data_dir, split, progress=False, **eval_kwargs)
    return os.path.join(spec[0]["ckpt"], "eval", m["dataset"], "run.retrieval.trec")


def task_rows(by_mode: dict, task: str, compare: Sequence = (), n_resamples: int = 10000, seed: int = 0,
              n_datasets: int = 1, n_aso: int = 1000) -> tuple:
    """One task on one dataset: by_mode {mode: {seed: (Q,) per-query values, the same queries}} -> (rows
    {mode: row}, comparisons {"A vs B": comparison}).

    A row: the mode's per-seed means, their mean and std; for a unified mode (when the task's specialist ran) TIR
    and the paired bootstrap of specialist - unified (compare_to_specialist) and ASO both ways on the per-seed
    means (aso_both_ways, a = the specialist, b = the unified mode, Bonferroni over the n_datasets datasets).
    compare: (A, B) mode pairs that both have runs on this task: the same tests of A - B."""
    spec, rows, comparisons = by_mode.get(SPECIALIST[task]), {}, {}
    for mode, seeds in by_mode.items():
        per_seed = [float(seeds[s].mean()) for s in sorted(seeds)]
        row = {"role": "specialist" if mode == SPECIALIST[task] else "unified", "seeds": sorted(seeds),
               "per_seed": per_seed, "mean": mean_or_none(per_seed), "std": std_or_none(per_seed)}
        if row["role"] == "unified" and spec is not None:
            row.update(compare_to_specialist(spec, seeds, n_resamples, seed))
            row["aso"] = {"a": SPECIALIST[task], "b": mode,
                          **aso_both_ways([float(spec[s].mean()) for s in sorted(spec)], per_seed, n_datasets,
                                          n_aso, seed)}
        rows[mode] = row
    for a, b in compare:
        if a in by_mode and b in by_mode:
            c = compare_to_specialist(by_mode[a], by_mode[b], n_resamples, seed)
            comparisons[f"{a} vs {b}"] = {"a": a, "b": b, "seeds_paired": c["seeds_paired"],
                                          "bootstrap": c["bootstrap"],
                                          "aso": {"a": a, "b": b, **aso_both_ways(rows[a]["per_seed"],
                                                                                  rows[b]["per_seed"], n_datasets,
                                                                                  n_aso, seed)}}
    return rows, comparisons


def apply_bonferroni(datasets: dict, alpha: float = 0.05) -> None:
    """Bonferroni over datasets, in place: each test (a unified mode against its specialist, or a compared pair,
    per task) is judged at alpha / m, m = the number of datasets where it was made; its entry gets "bonferroni":
    {"m", "threshold", "significant"} (bootstrap p <= threshold)."""
    tests = {}  # (task, kind, name) -> [entries, one per dataset]
    for tasks in datasets.values():
        for task, t in tasks.items():
            tests_here = [("mode", m, r) for m, r in t["modes"].items() if "bootstrap" in r] + \
                [("compare", k, c) for k, c in t["comparisons"].items()]
            for kind, name, entry in tests_here:
                tests.setdefault((task, kind, name), []).append(entry)
    for entries in tests.values():
        res = bonferroni([e["bootstrap"]["p_value"] for e in entries], alpha)
        for e, sig in zip(entries, res["significant"]):
            e["bonferroni"] = {"m": res["m"], "threshold": res["threshold"], "significant": sig}


def interference(runs: list, data_dirs: Sequence = (None,), split: Optional[str] = None, candidates: Sequence = (None,),
                 n_resamples: int = 10000, seed: int = 0, compare: Sequence = (), alpha: float = 0.05,
                 n_aso: int = 1000, **eval_kwargs) -> dict:
    """Per dataset and task: each mode's nDCG@10 over its seeds; for each unified mode TIR, the paired bootstrap
    and ASO against the task's specialist, and the same tests for each compared pair (A, B) of modes (task_rows);
    Bonferroni over the datasets (apply_bonferroni). See the module docstring. -> the interference.json dict."""
    n_datasets = len(data_dirs)
    out = {"metric": METRIC, "bootstrap": {"n_resamples": n_resamples, "seed": seed, "levels": "seeds, queries"},
           "significance": {"alpha": alpha, "datasets": n_datasets, "bonferroni": "over datasets: p <= alpha / m",
                            "aso": {"scores": "per-seed mean nDCG@10", "n_bootstrap": n_aso, "seed": seed,
                                    "confidence_level": 1 - alpha / n_datasets}},
           "runs": [{"path": r["path"], "mode": r["mode"], "seed": r["seed"]} for r in runs], "datasets": {}}
    for data_dir, cand in zip(data_dirs, candidates):
        if cand == "auto":
            cand = specialist_candidates(runs, data_dir, split, **eval_kwargs)
        values = {}  # run label -> task -> {qid: value}
        for r in runs:
            name, values[r["label"]] = per_query_metrics(r, data_dir, split, cand, **eval_kwargs)
        tasks = {}
        for task in config.TASKS:
            on_task = [r for r in runs if task in config.mode_tasks(r["mode"])]
            if not on_task:
                continue
            qids = sorted(set.intersection(*(set(values[r["label"]][task]) for r in on_task)))
            by_mode = {}  # mode -> {seed: (Q,) per-query values}
            for r in sorted(on_task, key=lambda r: (config.MODES.index(r["mode"]), r["seed"])):
                by_mode.setdefault(r["mode"], {})[r["seed"]] = np.array([values[r["label"]][task][q] for q in qids])
            rows, comparisons = task_rows(by_mode, task, compare, n_resamples, seed, n_datasets, n_aso)
            stage = "retrieval" if task == "embed" else "rerank" if cand else "two_stage"  # evaluate.py's stages
            tasks[task] = {"stage": stage, "candidates": cand if task == "rerank" else None,
                           "specialist": SPECIALIST[task], "num_queries": len(qids), "modes": rows,
                           "comparisons": comparisons}
        out["datasets"][name] = tasks
    apply_bonferroni(out["datasets"], alpha)
    return out


# ------------------------------------------------------------------------------------------------ gradients
def gradient_groups(um: unimoer.UniMoER, base_probe: bool) -> tuple:
    """-> (params {name: tensor}, groups {(where, kind): [(param name, index)]}), in module order.

    where "<layer>.<proj>" with kind an expert (its rank slots: rows of A, columns of B) or "base" (the frozen
    weight, when probing); where "<layer>.router" with kind "router"; where "all": each kind pooled over all
    layers, and "adapters" (every trainable tensor).
    """
    params, groups = {}, {}

    def add(where, kind, members):
        groups[(where, kind)] = members
        groups.setdefault(("all", kind), []).extend(members)
        if kind != "base":
            groups.setdefault(("all", "adapters"), []).extend(members)

    for name, mod in um.base.named_modules():
        if isinstance(mod, moe_lora.MoELoRALinear):
            where = ".".join(LINEAR_NAME.search(name).groups())
            params[name + ".A"], params[name + ".B"] = mod.lora_A, mod.lora_B
            for e in mod.expert_names:
                sl = mod.expert_slice(e)
                add(where, e, [(name + ".A", (sl, slice(None))), (name + ".B", (slice(None), sl))])
            if base_probe:
                if mod.base_linear is not None:
                    raise ValueError(f"gradient probe of the base: {name} is {mod.base_linear.scheme}-quantised "
                                     "(model.quant), with no float weight to take a gradient of; use --no-base-probe")
                params[name + ".W"] = mod.weight
                add(where, "base", [(name + ".W", None)])
        elif isinstance(mod, moe_lora.MoEHook) and mod.router is not None:
            names = [f"{name}.{n}" for n, _ in mod.router.named_parameters()]  # none for a task router
            params.update(zip(names, mod.router.parameters()))
            if names:
                add(f"{mod.layer_idx}.router", "router", [(n, None) for n in names])
    return params, groups


def gradient_conflict(run: dict, n_batches: int = 8, base_probe: bool = True) -> dict:
    """cos(grad L_emb, grad L_rank) per tensor group over n_batches training batches (see the module docstring).

    -> {"label", "mode", "steps", "groups": {where: {kind: {"cos_mean", "cos_std", "conflict_frac", "norm_emb",
    "norm_rank", "norm_ratio", "n"}}}}; n counts the batches where both gradients are non-zero (shared tensors).
    """
    um = unimoer.load_run(run["ckpt"]).eval()  # eval: no dropout or jitter, the deterministic function
    cfg, t = um.cfg, um.cfg.train
    examples = train.train_examples(cfg)
    sampler = data.TrainSampler(examples, t.batch_size // t.grad_accum, cfg.data.n_neg, t.seed)
    total = total_steps(cfg)
    steps = sorted(set(np.linspace(0, total - 1, n_batches).round().astype(int).tolist()))
    group = 1 + cfg.data.n_neg
    rank_fn = losses.bce_loss if t.rerank_loss == "bce" else losses.group_ce_loss
    params, groups = gradient_groups(um, base_probe)
    frozen = [p for p in params.values() if not p.requires_grad]
    per_group = {g: [] for g in groups}
    try:
        for p in frozen:  # the probe: gradients on the base weights, for this analysis only
            p.requires_grad_(True)
        for step in steps:  # the batch train.py trains on at this step (its first micro-batch)
            inputs = unimoer.batch_inputs(um, data.gather_texts(examples, sampler.batch(step * t.grad_accum)),
                                        config.TASKS)
            q_tok, d_tok, p_tok = inputs["queries"], inputs["docs"], inputs["pairs"]

            def loss_emb():
                out = um(queries=q_tok, docs=d_tok)
                return t.emb_weight * losses.info_nce_loss(out["q"], out["d"], t.temperature, cross_device=False)

            def loss_rank():
                return t.rank_weight * rank_fn(um(pairs=p_tok)["scores"], group)

            for g, v in gradient_cosine(params, loss_emb, loss_rank, groups).items():
                per_group[g].append(v)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    summary = {}
    for (where, kind), vals in per_group.items():
        cos = [v["cos"] for v in vals if v["cos"] is not None]
        na, nb = float(np.mean([v["norm_a"] for v in vals])), float(np.mean([v["norm_b"] for v in vals]))
        summary.setdefault(where, {})[kind] = {
            "cos_mean": mean_or_none(cos), "cos_std": std_or_none(cos), "n": len(cos), "norm_emb": na, "norm_rank": nb,
            "conflict_frac": float(np.mean([c < 0 for c in cos])) if cos else None,
            "norm_ratio": na / nb if nb > 0 else None}
    return {"label": run["label"], "mode": run["mode"], "steps": steps, "groups": summary}


# ------------------------------------------------------------------------------------------------ routing
def routing(run: dict, texts: dict) -> dict:
    """unimoer.routing_snapshot on each dataset's texts {name: (queries, docs, pairs)}, and <run>/routing.jsonl.

    -> {"label", "mode", "router": "learned" | "task (fixed weights)", "eval": {dataset: snapshot},
    "training": [snapshot with "step", ...]}
    """
    um = unimoer.load_run(run["ckpt"])
    spec = moe_lora.get_config(um.base)
    path = os.path.join(run["run_dir"], "routing.jsonl")
    training = [json.loads(x) for x in open(path) if x.strip()] if os.path.isfile(path) else []
    return {"label": run["label"], "mode": run["mode"],
            "router": "learned" if spec.router.kind == "learned" else "task (fixed weights)",
            "always_on": [e.name for e in spec.experts if e.name not in spec.routed_experts],
            "eval": {name: unimoer.routing_snapshot(um, *t) for name, t in texts.items()}, "training": training}


# ------------------------------------------------------------------------------------------------ geometry
@torch.no_grad()
def hidden_by_layer(um: unimoer.UniMoER, kind: str, items: list, batch_size: int = 32) -> list:
    """The pooled hidden state per layer: [embeddings, block 1, ..., block L, final norm], each (n, H) float64.

    kind "query" / "doc": the embedding path (its instruction, its pooling); "pair": the reranking path (its
    template, last token, where the yes/no logits are read).
    """
    rows = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        tok = um.tokens_pairs(*zip(*chunk)) if kind == "pair" else \
            (um.tokens_queries if kind == "query" else um.tokens_documents)(chunk)
        task = "rerank" if kind == "pair" else "embed"
        out, mask = um.run_base(task, tok, output_hidden_states=True)
        pos = um.pool_positions(task, mask)
        rows.append([h[torch.arange(mask.shape[0]), pos].double().cpu().numpy()  # (B, H) per layer
                     for h in out.layer_hidden + [out.hidden]])
    return [np.concatenate(layer) for layer in zip(*rows)]


def expert_geometry(um: unimoer.UniMoER) -> dict:
    """Per adapted linear: singular values of each expert's delta s_e B_e A_e and principal angles (degrees)
    between each pair of experts' column spaces, with the angles of random subspaces of the same sizes as a
    reference (one draw, default_rng(0)): random low-rank subspaces of a small space are far from orthogonal."""
    linears, random_ref, rng = {}, {}, np.random.default_rng(0)
    for name, lin in um.base.named_modules():
        if not isinstance(lin, moe_lora.MoELoRALinear):
            continue
        layer, proj = LINEAR_NAME.search(name).groups()
        svd = {e: expert_delta_svd(lin, e) for e in lin.expert_names}
        entry = {"singular_values": {e: s.tolist() for e, (s, _) in svd.items()}, "angles": {}, "random_angles": {}}
        basis = {e: u[:, s > s.max() * 1e-6] for e, (s, u) in svd.items() if s.max() > 0}  # a zero delta has none
        for i, a in enumerate(lin.expert_names):
            for b in lin.expert_names[i + 1:]:
                if a in basis and b in basis:
                    dims = (lin.out_features, basis[a].shape[1], basis[b].shape[1])
                    if dims not in random_ref:
                        random_ref[dims] = principal_angles(rng.standard_normal(dims[:2]),
                                                            rng.standard_normal(dims[::2]))
                    entry["angles"][f"{a}/{b}"] = np.degrees(principal_angles(basis[a], basis[b])).tolist()
                    entry["random_angles"][f"{a}/{b}"] = np.degrees(random_ref[dims]).tolist()
        linears[f"{layer}.{proj}"] = entry
    experts = moe_lora.get_config(um.base).experts
    summary = {"experts": {}, "pairs": {}}
    for e in (x.name for x in experts):
        svs = [np.array(v["singular_values"][e]) for v in linears.values()]
        summary["experts"][e] = {"top_sv": float(np.mean([s[0] for s in svs])),
                                 "fro": float(np.mean([np.sqrt((s ** 2).sum()) for s in svs])),
                                 "effective_rank": float(np.mean([effective_rank(s) for s in svs]))}
    for pair in sorted({p for v in linears.values() for p in v["angles"]}):
        angles = np.concatenate([v["angles"][pair] for v in linears.values() if pair in v["angles"]])
        ref = np.concatenate([v["random_angles"][pair] for v in linears.values() if pair in v["angles"]])
        summary["pairs"][pair] = {"mean_deg": float(angles.mean()), "min_deg": float(angles.min()),
                                  "random_mean_deg": float(ref.mean())}
    return {"linears": linears, "summary": summary}


def geometry(runs: list, texts: tuple) -> dict:
    """CKA across tasks (per model) and across configurations (same texts, per task), expert spectra and angles.

    texts (queries, docs, pairs) with docs[i] the relevant document of queries[i] and pairs[i] = (queries[i],
    docs[i]). Across tasks: document i on the embedding path vs pair i on the reranking path, per layer. Across
    configurations: the embedding path on queries + documents, the reranking path on the pairs.
    """
    queries, docs, pairs = texts
    reps, experts = {}, {}
    for r in runs:
        um = unimoer.load_run(r["ckpt"])
        reps[r["label"]] = {k: hidden_by_layer(um, k, list(v)) for k, v in (("query", queries), ("doc", docs),
                                                                             ("pair", pairs))}
        experts[r["label"]] = expert_geometry(um)
    labels = [r["label"] for r in runs]
    n_layers = len(reps[labels[0]]["doc"])
    layer_names = ["emb"] + [str(i) for i in range(n_layers - 2)] + ["final"]  # block i's output = layer i

    def cka(x, y):  # None where undefined (a constant side, e.g. the input embedding of an EOS every text ends in)
        c = linear_cka(x, y)
        return None if np.isnan(c) else c

    across_tasks = {lab: [cka(d, p) for d, p in zip(reps[lab]["doc"], reps[lab]["pair"])] for lab in labels}
    across = {}
    paths = (("embed", lambda x, i: np.vstack([x["query"][i], x["doc"][i]])), ("rerank", lambda x, i: x["pair"][i]))
    for task, pick in paths:
        across[task] = [[[cka(pick(reps[a], i), pick(reps[b], i)) for b in labels] for a in labels]
                        for i in range(n_layers)]  # (layer, config, config)
    return {"layers": layer_names, "labels": labels, "n_texts": len(pairs), "cka_across_tasks": across_tasks,
            "cka_across_configs": across, "experts": experts}


# ------------------------------------------------------------------------------------------------ report
def report(runs: list, out: str, data_dirs=(None,), split=None, candidates=(None,), n_batches: int = 8,
           n_texts: int = 64, n_resamples: int = 10000, seed: int = 0, base_probe: bool = True, compare=(),
           alpha: float = 0.05, n_aso: int = 1000, **eval_kwargs) -> str:
    """All four analyses into <out>: report.md, their JSON files and PNG plots. -> the path of report.md.

    Interference and CKA across configurations use every run; gradients (unified modes), routing, spectra and
    angles use one run per mode (the lowest seed).
    """
    try:  # plot-only dependency: imported here and nowhere else
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AnalysisError("report: the plots need matplotlib, which is not installed (plot-only, "
                            "requirements-dev.txt): pip install matplotlib") from None
    os.makedirs(out, exist_ok=True)
    picked = first_per_mode(runs)
    texts = dict(eval_texts(runs[0]["cfg"], d, split, n_texts) for d in data_dirs)
    inter = interference(runs, data_dirs, split, candidates, n_resamples, seed, compare, alpha, n_aso, **eval_kwargs)
    grads = [gradient_conflict(r, n_batches, base_probe) for r in picked if len(config.mode_tasks(r["mode"])) == 2]
    routs = [routing(r, texts) for r in picked]
    geo = geometry(runs, next(iter(texts.values())))
    for name, res in (("interference", inter), ("gradients", grads), ("routing", routs), ("geometry", geo)):
        _write_json(os.path.join(out, f"{name}.json"), res)
    plot_interference(plt, inter, os.path.join(out, "interference.png"))
    if grads:
        plot_gradients(plt, grads, os.path.join(out, "gradient_cosine.png"))
    learned = [r for r in routs if r["router"] == "learned"] or routs
    plot_routing(plt, learned, os.path.join(out, "routing.png"))
    plot_geometry(plt, geo, [r["label"] for r in picked], os.path.join(out, "cka.png"),
                   os.path.join(out, "expert_spectra.png"))
    md = ["# UniMoER analysis report", "", "| run | mode | seed | checkpoint |", "|---|---|---|---|"]
    md += [f"| {r['label']} | {r['mode']} | {r['seed']} | {r['ckpt']} |" for r in runs]
    md += ["", "## Task interference", "",
           "nDCG@10 per configuration (mean ± std over seeds); TIR = (specialist − unified) / specialist, > 0 "
           "means the unified model is worse; Δ and its 95% CI from a paired bootstrap over seeds and queries "
           f"({n_resamples} resamples), p two-sided.", "", significance_note(inter), "", interference_markdown(inter),
           "![](interference.png)", "",
           "## Gradient conflict", "", "cos(∇L_emb, ∇L_rank) on tensors both tasks reach, over training batches; "
           "base = the frozen weights as a probe.", "", gradients_markdown(grads) if grads else "No unified run.", ""]
    md += ["![](gradient_cosine.png)", ""] if grads else []
    md += ["## Routing", "", routing_markdown(routs), "![](routing.png)", "", "## Geometry", "",
           geometry_markdown(geo), "![](cka.png)", "", "![](expert_spectra.png)", ""]
    path = os.path.join(out, "report.md")
    ir.write_text_atomic(path, "\n".join(md))
    return path


# ------------------------------------------------------------------------------------------------ command line
def _write_json(path: str, obj) -> None:
    ir.write_text_atomic(path, json.dumps(obj, indent=1))


def parse_compare(text: str) -> tuple:
    """--compare A:B -> (A, B), two different modes."""
    pair = tuple(text.split(":"))
    if len(pair) != 2 or pair[0] == pair[1] or not all(m in config.MODES for m in pair):
        raise AnalysisError(f"--compare {text!r}: expected A:B, two different modes of {', '.join(config.MODES)}")
    return pair


def _write(out: str, name: str, res, md: str) -> None:
    _write_json(os.path.join(out, f"{name}.json"), res)
    ir.write_text_atomic(os.path.join(out, f"{name}.md"), md)
    print(md)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = ArgumentParser(prog="analysis.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    cmds = {c: sub.add_parser(c) for c in ("interference", "gradients", "routing", "geometry", "report")}
    for c, sp in cmds.items():
        sp.add_argument("ckpts", nargs="+", metavar="CKPT", help="run directories or checkpoint directories")
        sp.add_argument("--out", default="runs/analysis/report" if c == "report" else "runs/analysis")
        if c != "gradients":
            sp.add_argument("--data", action="append", help="BEIR folder (repeatable; geometry uses the first); "
                            "default: each run's own dev set")
            sp.add_argument("--split", default=None, help="qrels split of --data (default test)")
        if c in ("interference", "report"):
            sp.add_argument("--candidates", action="append", help="TREC run of fixed rerank candidates, one per "
                            "--data; 'auto': the emb_only run's own retrieval (lowest seed)")
            sp.add_argument("--resamples", type=int, default=10000)
            sp.add_argument("--bootstrap-seed", type=int, default=0)
            sp.add_argument("--compare", action="append", default=[], metavar="A:B",
                            help="also test mode A against mode B on each task both train (repeatable)")
            sp.add_argument("--alpha", type=float, default=0.05, help="familywise level, Bonferroni over datasets")
            sp.add_argument("--aso-bootstrap", type=int, default=1000, help="ASO's bootstrap resamples")
            sp.add_argument("--max-queries", type=int, default=None)
            sp.add_argument("--batch-size", type=int, default=None)
        if c in ("gradients", "report"):
            sp.add_argument("--batches", type=int, default=8, help="training batches, spread over the run")
            sp.add_argument("--no-base-probe", action="store_true", help="skip the gradients on the frozen weights")
        if c in ("routing", "geometry", "report"):
            sp.add_argument("--n", type=int, default=64, help="dev queries (each with a relevant document)")
    a = p.parse_args(argv)
    compare = [parse_compare(c) for c in getattr(a, "compare", [])]
    if not 0 < getattr(a, "alpha", 0.05) < 1:
        raise AnalysisError(f"--alpha must be in (0, 1) (got {a.alpha})")
    for name in ("resamples", "batches", "n", "max_queries", "batch_size", "aso_bootstrap"):
        if getattr(a, name, None) is not None and getattr(a, name) < 1:
            raise AnalysisError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    runs = load_runs(a.ckpts)
    data_dirs = getattr(a, "data", None) or [None]  # None: each run's own dev set
    candidates = getattr(a, "candidates", None) or [None] * len(data_dirs)
    if len(candidates) != len(data_dirs):
        raise AnalysisError(f"--candidates: give one per --data ({len(candidates)} for {len(data_dirs)})")
    eval_kwargs = {k: getattr(a, k) for k in ("max_queries", "batch_size") if getattr(a, k, None) is not None}
    texts = {}
    if a.cmd in ("routing", "geometry"):
        texts = dict(eval_texts(runs[0]["cfg"], d, a.split, a.n) for d in data_dirs)
    if a.cmd == "interference":
        res = interference(runs, data_dirs, a.split, candidates, a.resamples, a.bootstrap_seed, compare, a.alpha,
                           a.aso_bootstrap, **eval_kwargs)
        _write(a.out, "interference", res, significance_note(res) + "\n\n" + interference_markdown(res))
    elif a.cmd == "gradients":
        res = [gradient_conflict(r, a.batches, not a.no_base_probe) for r in runs]
        _write(a.out, "gradients", res, gradients_markdown(res))
    elif a.cmd == "routing":
        res = [routing(r, texts) for r in runs]
        _write(a.out, "routing", res, routing_markdown(res))
    elif a.cmd == "geometry":
        res = geometry(runs, next(iter(texts.values())))
        _write(a.out, "geometry", res, geometry_markdown(res))
    else:
        path = report(runs, a.out, data_dirs, a.split, candidates, a.batches, a.n, a.resamples,
                      a.bootstrap_seed, not a.no_base_probe, compare, a.alpha, a.aso_bootstrap, **eval_kwargs)
        print(open(path).read())
        print(f"wrote {path}")


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python analysis.py ...` through the CLIs' one error path (model.run_cli): a wrong path, config or data
    error (or an AnalysisError) is one line, exit code 2; `--debug` shows its traceback."""
    return run_cli("analysis.py", main, argv, known=(AnalysisError,))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
