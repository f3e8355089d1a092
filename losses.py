"""The training losses, each one visible function: InfoNCE over in-batch and hard negatives (cross-device under
DDP) and its Matryoshka sum over embedding prefixes, the reranker's pointwise BCE, group-wise softmax CE or RankNet
(E2Rank: ranknet_loss), the routers' aux losses over train.aux_scope's units, and the weighted total
alpha * L_emb + beta * L_rank + sum_n lambda_n * L_aux_n (train.aux_weights: the one place the aux losses are weighted).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import Config
from aux_stats import finalize_over_layers


def _gather_keep_local(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over ranks; only the local slice carries gradient (the others are detached copies)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def loss_world(cross_device: bool) -> int:
    """The factor info_nce_loss multiplies by (world size under DDP with cross-device negatives, else 1)."""
    return dist.get_world_size() if cross_device and dist.is_available() and dist.is_initialized() else 1


def info_nce_loss(q: torch.Tensor, d: torch.Tensor, temperature: float, cross_device: bool) -> torch.Tensor:
    """InfoNCE over in-batch and hard negatives: q (b, H), d (b * g, H) with query i's positive at row i * g.

    cross_device (under DDP): queries and documents of all ranks are gathered, every rank computes the loss of the
    whole global batch with gradients through its own slice only, and the loss is multiplied by world_size because
    DDP averages gradients over ranks. This is the one place the scaling is done; the result equals one process on
    the concatenated batch (tests/test_ddp.py). The returned value is the global mean times loss_world(...).
    """
    g = d.shape[0] // q.shape[0]
    world = loss_world(cross_device)
    if world > 1:
        q, d = _gather_keep_local(q), _gather_keep_local(d)
    scores = q @ d.t() / temperature  # (N, N * g)
    labels = torch.arange(q.shape[0], device=q.device) * g
    return F.cross_entropy(scores, labels) * world


def matryoshka_loss(q: torch.Tensor, d: torch.Tensor, dims: Sequence[int], weights: Sequence[float],
                    temperature: float, cross_device: bool) -> tuple:
    """Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022, arXiv 2205.13147, eq. 1; official code
    RAIVNLab/MRL, MRL.py Matryoshka_CE_Loss) with InfoNCE as the loss at each granularity:

        L = sum_{m in M} c_m * InfoNCE(normalize(q[:, :m]), normalize(d[:, :m]))  -> (L, {m: InfoNCE at m})

    q (b, H), d (b * g, H) as info_nce_loss; each term is exactly info_nce_loss on the renormalised prefixes
    (cross-device negatives and its DDP scaling included). M = `dims` plus the full width H when not listed (the
    paper's M = {8, 16, ..., d} always holds d; its training code nests up to 2048 = d), with c_m = `weights`
    (default all 1, the paper's c_m = 1; an unlisted H gets 1). A weighted sum, not a mean, as eq. 1 and the
    official loss (`weighted_losses.sum()`). Under GradCache q and d are the cached full vectors: the truncation
    is here, so the cache is unchanged.
    """
    h = q.shape[1]
    if max(dims, default=0) > h:
        raise ValueError(f"train.matryoshka_dims {list(dims)}: dims must be <= the embedding width {h}")
    c = dict(zip(dims, weights or [1.0] * len(dims)))
    c.setdefault(h, 1.0)
    parts = {m: info_nce_loss(F.normalize(q[:, :m], dim=-1), F.normalize(d[:, :m], dim=-1), temperature,
                              cross_device) for m in sorted(c)}
    return sum(c[m] * parts[m] for m in parts), parts


def bce_loss(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Pointwise BCE on the relevance logits: (b * group,) with each group's first entry the positive."""
    labels = torch.zeros_like(scores).view(-1, group)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels.view(-1))


def group_ce_loss(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Group-wise softmax cross-entropy (localized contrastive): the positive against its own negatives."""
    s = scores.view(-1, group)
    return F.cross_entropy(s, torch.zeros(s.shape[0], dtype=torch.long, device=s.device))


def ranknet_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RankNet (Burges et al. 2005) over lists, as E2Rank trains its listwise scores (Liu et al. 2025, arXiv
    2510.22733; Alibaba-NLP/E2Rank src/modeling.py rank_net, called unweighted):
        L = mean over all pairs (i, j) of one list with labels_i > labels_j of log(1 + exp(-(s_i - s_j)))
    scores (b, n) logits (E2Rank: cos / train.e2rank_temperature), labels (b, n) graded relevance. Pairs of equal
    label do not count; the mean is over the pairs of the whole batch (BCE-with-logits against 1 on s_i - s_j)."""
    better = labels[:, :, None] > labels[:, None, :]  # (b, n, n): i above j
    diff = scores[:, :, None] - scores[:, None, :]  # (b, n, n): s_i - s_j
    return F.softplus(-diff[better]).mean()


def ranknet_group_loss(scores: torch.Tensor, group: int) -> torch.Tensor:
    """ranknet_loss on training groups: (b * group,) with each group's first entry the positive (label 1) and
    the rest its negatives (label 0), so the pairs are (positive, each negative)."""
    s = scores.view(-1, group)
    labels = torch.zeros_like(s)
    labels[:, 0] = 1.0
    return ranknet_loss(s, labels)


def aux_losses(calls: Sequence[dict], scope: str) -> dict:
    """The routers' aux losses of one optimizer step from their statistics -> {name: scalar}, each the mean over
    the adapted layers of the loss over `scope`'s units (sequences, or non-pad tokens for token routing).

    calls: [{name: [aux_stats.AuxStat per layer]}] of every base call of the step on this rank (queries, documents
    and pairs of every GradCache chunk; UniMoER.forward's "aux_calls"). Load balance is N * sum_i f_i P_i with
    f_i (Switch: dispatch fraction, no grad; DynMoLE: mean routed weight, with grad; LD-MoLE: share of all expert
    activations) and P_i (mean router probability) over the units (Switch, Fedus et al. 2022, eq. 4-6); z_loss and
    entropy are means over the units. DynMoLE's load balance is one loss over layers x units, not a mean over layers
    (aux_stats.finalize_over_layers).
      "call":   each call on its own units, then the mean over calls. Every call holds one task, so load balance
                then asks for balance within each task (the per-forward variant, kept for the ablation).
      "step":   the union of all the step's calls on this rank, both tasks together (Switch's batch). Under DDP
                each rank's own loss, averaged by DDP (per-device balancing).
      "global": "step" with the statistics summed over DDP ranks (global-batch balancing, Qiu et al. 2025,
                arXiv 2501.11873): the loss of the whole global batch, as one process on the concatenated batch
                computes it. Like info_nce_loss, the value is multiplied by loss_world(True) and carries gradient
                through this rank's units only, so DDP's gradient average is the global loss's gradient
                (tests/test_ddp.py). Equal to "step" on one process.
    """
    names = sorted({k for c in calls for k in c})  # a fixed order: a set's follows PYTHONHASHSEED (per process)
    per_call = {k: [c[k] for c in calls if k in c] for k in names}  # name -> [[AuxStat per layer] per call]
    if scope == "call":
        return {k: torch.stack([finalize_over_layers(layers) for layers in v]).mean() for k, v in per_call.items()}
    union = {k: [sum(layer[1:], layer[0]) for layer in zip(*v)] for k, v in per_call.items()}  # per layer
    world = loss_world(scope == "global")
    if world > 1:
        summed = iter(_sum_over_ranks([st for k in names for st in union[k]]))
        union = {k: [next(summed) for _ in union[k]] for k in names}
    return {k: finalize_over_layers(v) * world for k, v in union.items()}


def _sum_over_ranks(stats: list) -> list:
    """aux_stats.AuxStats summed over the DDP ranks in one all_reduce. Counts carry no gradient; a total's (and a
    dispatch sum's, which carries gradient for DynMoLE's f) value becomes the global sum with gradient through this
    rank's own tensor only (the others are constants, as in _gather_keep_local)."""
    parts = [[st.total.detach().reshape(-1), st.count.reshape(1).to(st.total.dtype)]
             + ([st.dispatch.detach().reshape(-1).to(st.total.dtype)] if st.dispatch is not None else [])
             for st in stats]
    flat = torch.cat([x for p in parts for x in p])
    dist.all_reduce(flat)
    out, i = [], 0
    for st in stats:
        n = st.total.numel()
        total = flat[i:i + n].view_as(st.total) + (st.total - st.total.detach())  # value: global; grad: local
        count, i = flat[i + n], i + n + 1
        dispatch = None
        if st.dispatch is not None:
            dispatch = flat[i:i + n].view_as(st.dispatch) + (st.dispatch - st.dispatch.detach())
            i += n
        out.append(dataclasses.replace(st, total=total, count=count, dispatch=dispatch))
    return out


def nli_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The added task's classification loss (an extension, extend.py): mean cross-entropy over the batch,
    -1/B sum_i log softmax(logits_i)[y_i], logits (B, C) and labels (B,) class indices."""
    return F.cross_entropy(logits.float(), labels)


TASK_WEIGHT_KEYS = {"emb": "emb_weight", "rank": "rank_weight"}  # task loss -> its train.* weight
NLI = "nli"  # task_losses' key of the added task's loss (weight 1: the only task loss of an extension)
LOG_ONLY = "emb@"  # task_losses' "emb@<m>": each Matryoshka dim's InfoNCE, detached, for the log only


def task_losses(out: dict, cfg: Config, group: int) -> dict:
    """The step's unweighted losses -> {"emb": L_emb, "rank": L_rank (those present), aux name: L_aux_n}.
    With train.matryoshka_dims, L_emb is matryoshka_loss's weighted sum and "emb@<m>" (detached, log only) each
    dim's InfoNCE (emb@<H>, the full width, is the plain run's "emb").

    out: "q"/"d" (embedding), "scores" (reranking), "aux" {name: loss} (aux_losses), each over the whole step.
    L_emb carries info_nce_loss's DDP factor loss_world(...), the aux terms aux_losses' (see logged_values)."""
    t, parts = cfg.train, {}
    if "q" in out and t.matryoshka_dims:
        parts["emb"], per_dim = matryoshka_loss(out["q"], out["d"], t.matryoshka_dims, t.matryoshka_weights,
                                                t.temperature, t.cross_device_negatives)
        parts.update({f"{LOG_ONLY}{m}": v.detach() for m, v in per_dim.items()})
    elif "q" in out:
        parts["emb"] = info_nce_loss(out["q"], out["d"], t.temperature, t.cross_device_negatives)
    if "scores" in out:
        fn = {"bce": bce_loss, "group": group_ce_loss, "ranknet": ranknet_group_loss}[t.rerank_loss]
        parts["rank"] = fn(out["scores"], group)
    if "nli_logits" in out:
        parts[NLI] = nli_loss(out["nli_logits"], out["nli_labels"])
    parts.update(out["aux"])
    return parts


def aux_terms(parts: dict, cfg: Config) -> list:
    """[lambda_n * L_aux_n] over the aux terms of task_losses' dict (train.aux_weights; unlisted: weight 0)."""
    return [cfg.train.aux_weights.get(k, 0.0) * v for k, v in parts.items()
            if k not in TASK_WEIGHT_KEYS and k != NLI and not k.startswith(LOG_ONLY)]


def logged_values(parts: dict, cfg: Config) -> dict:
    """{name: float} for the log: the global means, without the DDP gradient factors of L_emb and the aux terms."""
    t = cfg.train
    logged = {k: float(v.detach()) for k, v in parts.items()}
    for name in parts:
        if name == "emb" or name.startswith(LOG_ONLY):
            logged[name] /= loss_world(t.cross_device_negatives)
        elif name not in TASK_WEIGHT_KEYS and name != NLI:
            logged[name] /= loss_world(t.aux_scope == "global")
    return logged


def total_loss(out: dict, cfg: Config, group: int, task_weights=None) -> tuple:
    """alpha * L_emb + beta * L_rank + sum_n lambda_n * L_aux_n -> (loss, {name: value} for the log).

    out: as task_losses. task_weights: None (alpha, beta = train.emb_weight, rank_weight), or a function of
    task_losses' dict -> {"emb": w, "rank": w} (train.mtl's learned weights, mtl.py; constants for autograd)."""
    parts = task_losses(out, cfg, group)
    weights = task_weights(parts) if task_weights is not None else \
        {k: getattr(cfg.train, v) for k, v in TASK_WEIGHT_KEYS.items()}
    loss = sum([weights[k] * parts[k] for k in TASK_WEIGHT_KEYS if k in parts] + ([parts[NLI]] if NLI in parts else [])
               + aux_terms(parts, cfg))
    return loss, logged_values(parts, cfg)
