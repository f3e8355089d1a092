"""analysis.py's results as markdown tables and PNG plots (matplotlib's pyplot is passed in by analysis.report,
the only place it is imported)."""
from __future__ import annotations

import numpy as np

import config


# ------------------------------------------------------------------------------------------------ markdown
def _f(x, digits: int = 3, signed: bool = False) -> str:
    x = None if x is None or x != x else x + 0.0  # None and NaN print as —, -0.0 as 0
    return "—" if x is None else f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def significance_note(res: dict) -> str:
    """What the significance columns are and what is corrected (interference's "significance" entry)."""
    sig = res["significance"]
    m, alpha = sig["datasets"], sig["alpha"]
    return (f"Significance at familywise α = {alpha}, Bonferroni over the {m} dataset{'s' if m > 1 else ''} "
            f"compared: a bootstrap p is significant (✓) when p ≤ α / {m} = {alpha / m:.4g}. ASO (Almost Stochastic "
            f"Order, Dror et al. 2019) on the per-seed mean nDCG@10, at confidence 1 − α / {m} = "
            f"{sig['aso']['confidence_level']:.4g} ({sig['aso']['n_bootstrap']} bootstrap resamples), both ways: "
            "ε_min(A ≻ B) < 0.5 says A is almost stochastically better than B, 0 that A dominates; A is the specialist "
            "(the first term of Δ) in the mode table, the first named mode in a comparison. Not corrected: the "
            "several modes, tasks and comparisons within a dataset.")


def _tests(b: dict, aso: dict, bonf: dict) -> str:
    """'Δ [95% CI] | p | sig. | ASO ε_min A≻B / B≻A' cells of one test."""
    return (f"{_f(b['mean'], signed=True)} [{_f(b['ci95'][0], signed=True)}, {_f(b['ci95'][1], signed=True)}] | "
            f"{_f(b['p_value'], 4)} | {'✓' if bonf['significant'] else '–'} | "
            f"{_f(aso['eps_min_a_over_b'], 2)} / {_f(aso['eps_min_b_over_a'], 2)}")


def interference_markdown(res: dict) -> str:
    lines = ["| task | dataset | mode | seeds | nDCG@10 mean ± std | TIR mean ± std | Δ = spec − unified [95% CI] "
             "| p | sig. | ASO ε_min spec≻uni / uni≻spec |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pairs = []
    for ds, tasks in res["datasets"].items():
        for task, t in tasks.items():
            for mode, row in t["modes"].items():
                b = row.get("bootstrap")
                tir = f"{_f(row['tir_mean'], signed=True)} ± {_f(row['tir_std'])}" if "tir_mean" in row else \
                    ("(specialist)" if row["role"] == "specialist" else "no specialist run")
                tests = _tests(b, row["aso"], row["bonferroni"]) if b else " | | |"
                lines.append(f"| {task} ({t['stage']}) | {ds} | {mode} | {','.join(map(str, row['seeds']))} | "
                             f"{_f(row['mean'])} ± {_f(row['std'])} | {tir} | {tests} |")
            pairs += [(task, t["stage"], ds, c) for c in t.get("comparisons", {}).values()]
    if pairs:
        lines += ["", "| task | dataset | A vs B | Δ = A − B [95% CI] | p | sig. | ASO ε_min A≻B / B≻A |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {task} ({stage}) | {ds} | {c['a']} vs {c['b']} | "
                  f"{_tests(c['bootstrap'], c['aso'], c['bonferroni'])} |" for task, stage, ds, c in pairs]
    if any(t["stage"] == "two_stage" for tasks in res["datasets"].values() for t in tasks.values()):
        lines += ["", "rerank (two_stage): each model reranks its own retrieval, so rank_only's figure mostly "
                  "measures its first stage (its reranking expert, untrained for embedding). `--candidates auto` "
                  "(or a TREC run) makes every model rerank the same list."]
    return "\n".join(lines) + "\n"


def _kinds(groups: dict) -> list:
    return list(dict.fromkeys(k for where, v in groups.items() if where != "all" for k in v))


def gradients_markdown(results: list) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['label']} ({len(res['steps'])} batches, steps {res['steps']})", "",
                  "| tensors (all layers) | cos(g_emb, g_rank) mean ± std | conflicting (cos < 0) "
                  "| ‖g_emb‖ / ‖g_rank‖ |",
                  "|---|---|---|---|"]
        for kind, v in res["groups"]["all"].items():
            lines.append(f"| {kind} | {_f(v['cos_mean'], signed=True)} ± {_f(v['cos_std'])} | "
                         f"{_f(v['conflict_frac'], 2) if v['n'] else 'not shared'} | {_f(v['norm_ratio'], 2)} |")
        kinds = _kinds(res["groups"])
        lines += ["", "Mean cosine per layer and projection (—: not shared, only one task reaches it):", "",
                  "| layer.proj | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        lines += [f"| {where} | " + " | ".join(_f(v.get(k, {}).get("cos_mean"), 2, True) for k in kinds) + " |"
                  for where, v in res["groups"].items() if where != "all"]
        lines.append("")
    return "\n".join(lines)


def routing_markdown(results: list) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['label']}: router {res['router']}" + (f", always on: {', '.join(res['always_on'])}"
                                                                   if res["always_on"] else ""), ""]
        for ds, snap in res["eval"].items():
            lines += [f"Mean routing weight per expert and mean entropy (nats) on {ds}:", "",
                      "| task | layer | " + " | ".join(snap["experts"]) + " | entropy |",
                      "|---" * (len(snap["experts"]) + 3) + "|"]
            for task in config.TASKS:
                for layer, w, h in zip(snap[task]["layers"], snap[task]["weights"], snap[task]["entropy"]):
                    lines.append(f"| {task} | {layer} | " + " | ".join(_f(x) for x in w) + f" | {_f(h)} |")
            lines.append("")
        if res["training"]:
            experts = res["training"][0]["experts"]
            lines += ["Over training (routing.jsonl; mean over layers):", "",
                      "| step | task | " + " | ".join(experts) + " | entropy |", "|---" * (len(experts) + 3) + "|"]
            for snap in res["training"]:
                for task in config.TASKS:
                    w = np.mean(snap[task]["weights"], axis=0)
                    lines.append(f"| {snap['step']} | {task} | " + " | ".join(_f(x) for x in w)
                                 + f" | {_f(float(np.mean(snap[task]['entropy'])))} |")
            lines.append("")
        elif res["router"] != "learned":
            lines += ["No learned router: the weights above are the mode's fixed task routing.", ""]
    return "\n".join(lines)


def geometry_markdown(res: dict) -> str:
    L = res["layers"]
    lines = [f"CKA between a document on the embedding path and its (query, document) pair on the reranking path, "
             f"per layer ({res['n_texts']} pairs):", "", "| model | " + " | ".join(L) + " |",
             "|---" * (len(L) + 1) + "|"]
    lines += [f"| {lab} | " + " | ".join(_f(x, 2) for x in v) + " |" for lab, v in res["cka_across_tasks"].items()]
    for task, per_layer in res["cka_across_configs"].items():
        lines += ["", f"CKA across configurations, {task} path, final layer:", "",
                  "| | " + " | ".join(res["labels"]) + " |", "|---" * (len(res["labels"]) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(_f(x, 2) for x in row) + " |"
                  for a, row in zip(res["labels"], per_layer[-1])]
    lines += ["", "Experts' deltas s B A (mean over adapted linears) and principal angles between their column spaces:",
              "", "| model | expert | top singular value | ‖Δ‖_F | effective rank |", "|---|---|---|---|---|"]
    for lab, g in res["experts"].items():
        lines += [f"| {lab} | {e} | {_f(v['top_sv'], 4)} | {_f(v['fro'], 4)} | {_f(v['effective_rank'], 2)} |"
                  for e, v in g["summary"]["experts"].items()]
    lines += ["", "| model | experts | mean angle (deg) | min angle | random subspaces, mean |",
              "|---|---|---|---|---|"]
    for lab, g in res["experts"].items():
        lines += [f"| {lab} | {p} | {_f(v['mean_deg'], 1)} | {_f(v['min_deg'], 1)} | {_f(v['random_mean_deg'], 1)} |"
                  for p, v in g["summary"]["pairs"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def plot_interference(plt, res: dict, path: str) -> None:
    panels = [(ds, task, t) for ds, tasks in res["datasets"].items() for task, t in tasks.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (ds, task, t) in zip(axes[0], panels):
        modes = list(t["modes"])
        for i, m in enumerate(modes):
            row = t["modes"][m]
            ax.bar(i, row["mean"], yerr=row["std"] or 0, alpha=0.7, capsize=3,
                   color="tab:gray" if row["role"] == "specialist" else "tab:blue")
            ax.plot([i] * len(row["per_seed"]), row["per_seed"], "k.", ms=4)
        ax.set_xticks(range(len(modes)), modes, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task} ({ds})", fontsize=9)
        ax.set_ylabel("nDCG@10")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_gradients(plt, grads: list, path: str) -> None:
    fig, axes = plt.subplots(len(grads), 1, figsize=(8, 2.4 * len(grads)), squeeze=False)
    for ax, res in zip(axes[:, 0], grads):
        linears = [w for w in res["groups"] if w not in ("all",) and not w.endswith(".router")]
        for kind in _kinds(res["groups"]):
            ys = [res["groups"][w].get(kind, {}).get("cos_mean") for w in linears]
            if any(y is not None for y in ys):
                ax.plot(range(len(linears)), [np.nan if y is None else y for y in ys], "o-", ms=3, label=kind)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(linears)), linears, rotation=90, fontsize=6)
        ax.set_ylabel("cos(g_emb, g_rank)")
        ax.set_title(res["label"], fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_routing(plt, routs: list, path: str) -> None:
    fig, axes = plt.subplots(len(routs), 3, figsize=(10, 2.6 * len(routs)), squeeze=False)
    for row, res in zip(axes, routs):
        snap = next(iter(res["eval"].values()))
        routed = [i for i, e in enumerate(snap["experts"]) if e not in res["always_on"]]
        for ax, task in zip(row, config.TASKS):
            w = np.array(snap[task]["weights"])  # (layers, experts)
            for i in routed:
                ax.plot(snap[task]["layers"], w[:, i], "o-", color=f"C{i}", ms=3, label=snap["experts"][i])
            ax.set(ylim=(-0.05, 1.05), xlabel="layer", xticks=snap[task]["layers"])
            ax.set_title(f"{res['label']}: {task} (eval)", fontsize=9)
        row[0].legend(fontsize=7)
        for task, style in zip(config.TASKS, ("-", "--")):  # over training: colour = expert, line style = task
            for i in routed:
                row[2].plot([s["step"] for s in res["training"]], [np.mean(s[task]["weights"], axis=0)[i]
                                                                   for s in res["training"]],
                            style, color=f"C{i}", label=f"{task}: {snap['experts'][i]}")
        row[2].set_title("over training, mean over layers" if res["training"] else "no routing.jsonl", fontsize=9)
        row[2].set_xlabel("step")
        if res["training"]:
            row[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_geometry(plt, geo: dict, labels: list, cka_path: str, spectra_path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, task in zip(axes, ("embed", "rerank")):
        im = ax.imshow(np.array(geo["cka_across_configs"][task][-1], dtype=float), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(geo["labels"])), geo["labels"], rotation=90, fontsize=6)
        ax.set_yticks(range(len(geo["labels"])), geo["labels"], fontsize=6)
        ax.set_title(f"linear CKA across configurations, {task} path", fontsize=8)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    fig.tight_layout()
    fig.savefig(cka_path, dpi=80)
    plt.close(fig)
    cols = min(4, len(labels))
    fig, axes = plt.subplots(-(-len(labels) // cols), cols, figsize=(3.2 * cols, 2.6 * -(-len(labels) // cols)),
                             squeeze=False)
    for ax, lab in zip(axes.flat, labels):
        lin = geo["experts"][lab]["linears"]
        for e in next(iter(lin.values()))["singular_values"]:
            svs = [v["singular_values"][e] for v in lin.values()]  # fewer than r where a linear is narrower
            n = min(len(x) for x in svs)
            ax.semilogy(np.mean([x[:n] for x in svs], axis=0), "o-", ms=3, label=e)
        ax.set_title(f"{lab}: singular values of s B A", fontsize=8)
        ax.set_xlabel("index (mean over linears)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(spectra_path, dpi=80)
    plt.close(fig)
