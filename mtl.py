"""Multi-task gradient methods over the two task losses, L_emb (InfoNCE) and L_rank (the reranking loss):
`train.mtl` none | pcgrad | gradnorm | famo. train.forward_backward calls them on a step that trains both tasks; a
step with one task (a one-task stage) is the plain step, and the state of GradNorm / FAMO does not move on it.

Shared parameters (shared_masks). The experts of a linear are stacked in one lora_A / lora_B, so "shared" is decided
per rank slot from the structure, with the rule of train.untrained_experts (experts_reached): an element is shared
when every task of the step can reach its expert (an always-on expert; every routed expert under a learned router;
a task router's or RouterRetriever's router.task_experts) and the step trains it (not frozen, train.frozen_slices).
A learned router's tensors serve both tasks: shared. The linear reranking head is reached by reranking only.
Task-specific elements get the plain sum of the task gradients, which there is their own task's gradient.

Aux losses (train.aux_weights) are not a task: their gradient is added after the surgery (PCGrad) and unweighted by
the learned task weights (GradNorm, FAMO), as sum_n lambda_n grad L_aux_n.

DDP: PCGrad and GradNorm run the step's forward under model.no_sync() and average every gradient they take (each
task's, the aux terms', the weighted total's) over the ranks themselves (mean_over_ranks), before the surgery and the
norms. The task loss values the weights are computed from are global (global_values). Tested on one process only.

Costs per step (benchmarks/bench_methods.py prints them): PCGrad one backward per task plus one for the aux terms
(the two tasks' forward graphs are disjoint, so each task's backward covers only its own forward); GradNorm one short
backward per task down to W plus the full backward of the weighted loss; FAMO one backward (same_batch: plus one
forward without grad).
"""
from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moe_lora
from config import Config
from losses import TASK_WEIGHT_KEYS, loss_world

# --------------------------------------------------------------------------------------------- shared parameters
def experts_reached(spec: moe_lora.MoELoRAConfig, task: str) -> set:
    """The experts a task's inputs can reach, from the structure alone: the always-on ones, every routed expert under
    a learned router, the task's router.task_experts under a task router or RouterRetriever."""
    reached = {e.name for e in spec.experts if e.name not in spec.routed_experts}
    if spec.router.kind == "learned":
        return reached | set(spec.routed_experts)
    return reached | set(spec.router.task_experts[task])


def shared_masks(um, params: Sequence[torch.Tensor], tasks: Sequence[str], held: Sequence[tuple]) -> list:
    """Per trainable parameter (params' order) a bool tensor of its shape: True where every task of `tasks` reaches
    the element and the step trains it. held: train.frozen_slices of the step ([(tensor, index)])."""
    spec = moe_lora.get_config(um.base)
    both = set.intersection(*(experts_reached(spec, t) for t in tasks))
    masks = {}
    for m in um.base.modules():
        if isinstance(m, moe_lora.MoELoRALinear):
            a = torch.zeros(m.lora_A.shape, dtype=torch.bool, device=m.lora_A.device)
            b = torch.zeros(m.lora_B.shape, dtype=torch.bool, device=m.lora_B.device)
            for name in both:
                sl = m.expert_slice(name)
                a[sl], b[:, sl] = True, True
            masks[m.lora_A], masks[m.lora_B] = a, b
    for p in (um.head.parameters() if um.head is not None else ()):
        masks[p] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    for tensor, idx in held:
        masks[tensor][idx] = False
    return [masks[p] if p in masks else torch.ones(p.shape, dtype=torch.bool, device=p.device) for p in params]


def last_layer_parameters(um, params: Sequence[torch.Tensor]) -> list:
    """Indices into params of GradNorm's W: lora_A and lora_B of every linear of the last adapted layer (used
    through their shared slots: the last layer's weights both tasks reach)."""
    hooks = [b.adapter_hook for b in um.base.model.layers if getattr(b, "adapter_hook", None) is not None]
    last = max(hooks, key=lambda h: h.layer_idx)
    tensors = [t for lin in last.linears for t in (lin.lora_A, lin.lora_B)]
    return [i for i, p in enumerate(params) if any(p is t for t in tensors)]


# --------------------------------------------------------------------------------------------- gradients
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(tensors: Sequence[torch.Tensor]) -> list:
    """The tensors averaged over the DDP ranks in one all_reduce (what DDP does to .grad); unchanged on one process."""
    world = world_size()
    if world == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    return [x.view_as(t) for x, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]


def task_gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list:
    """d loss / d p for each p (zeros where the loss does not reach p), graph kept, averaged over ranks."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return mean_over_ranks([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])


def global_values(parts: dict, cfg: Config) -> torch.Tensor:
    """(T,) the task losses' values (losses.task_losses order "emb", "rank"), detached, as one process on the global
    batch computes them: L_emb without info_nce_loss's DDP factor, L_rank averaged over the ranks."""
    emb = parts["emb"].detach() / loss_world(cfg.train.cross_device_negatives)
    rank = mean_over_ranks([parts["rank"].detach().reshape(1)])[0][0]
    return torch.stack([emb, rank])


def add_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone() if p.grad is None else p.grad + g


def backward_aux(aux: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    """The aux terms' gradient into .grad (averaged over ranks), skipped when no aux term has a weight."""
    live = [a for a in aux if a.requires_grad]
    if live:
        add_grads(params, task_gradients(sum(live), params))


# --------------------------------------------------------------------------------------------- PCGrad
def pcgrad(grads: Sequence[torch.Tensor], shuffle: Callable = random.shuffle) -> list:
    """PCGrad's projection (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", NeurIPS, arXiv 2001.06782,
    Alg. 1; official code tianheyu927/PCGrad PCGrad_tf.py, PyTorch port WeiChengTseng/Pytorch-PCGrad pcgrad.py):
    for each task i, g_i^PC = g_i, then for each j != i in random order, if g_i^PC . g_j < 0,

        g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j     (against the ORIGINAL g_j)

    grads: the flat per-task gradients g_i on the shared elements -> [g_i^PC]; the update is their sum (the paper and
    the TF code sum; the port's default is the mean). shuffle: the random order (Python's random, whose state the
    checkpoint keeps; with two tasks there is one j and nothing is drawn)."""
    out = []
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(len(grads)) if j != i]
        shuffle(others)
        for j in others:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return out


class PCGrad:
    """train.mtl: pcgrad. Per-task gradients by one backward each (torch.autograd.grad, graph retained), averaged over
    ranks; pcgrad() on the shared elements, summed; task-specific elements get the plain sum; then the aux terms'
    gradient is added. The task losses keep their train.emb_weight / rank_weight (g_i = grad of alpha L_emb, beta
    L_rank). Logs pc_cos, the cosine of the two shared task gradients before the surgery. No state."""

    per_task_gradients = True

    def __init__(self):
        self.step_log = {}

    def backward(self, tasks: dict, aux: Sequence[torch.Tensor], params: Sequence[torch.Tensor], masks: list,
                 um=None) -> None:
        grads = [task_gradients(loss, params) for loss in tasks.values()]  # [task][param]
        shared = [torch.cat([g[m] for g, m in zip(gs, masks)]) for gs in grads]
        merged = sum(pcgrad(shared))
        total, k = [], 0
        for i, m in enumerate(masks):
            g = sum(gs[i] for gs in grads)
            n = int(m.sum())
            g[m] = merged[k:k + n]
            total.append(g)
            k += n
        backward_aux(aux, params)
        add_grads(params, total)
        cos = F.cosine_similarity(shared[0], shared[1], dim=0) if shared[0].numel() else torch.zeros(())
        self.step_log = {"pc_cos": float(cos)}

    def after_step(self, new_parts: Callable) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------- GradNorm
class GradNorm:
    """train.mtl: gradnorm (Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
    Multitask Networks", ICML, arXiv 1711.02257, eq. 1-2 and Alg. 1; no official code: checked against LibMTL's
    weighting/GradNorm.py). Task weights w_i (init 1); the model trains on L = sum_i w_i L_i (+ the aux terms).

        G_i = ||grad_W w_i L_i|| = w_i ||grad_W L_i||,  Gbar = mean_i G_i
        Ltilde_i = L_i(t) / L_i(0),  r_i = Ltilde_i / mean_j Ltilde_j
        L_grad = sum_i |G_i - Gbar r_i^alpha|     (eq. 2; the target Gbar r_i^alpha a constant)

    w takes one Adam step (train.gradnorm_lr, null: train.lr) on grad_w L_grad and is renormalised to sum_i w_i = T.
    W (the paper's last shared layer): the shared slots of the last adapted layer's lora_A / lora_B
    (last_layer_parameters & shared_masks). grad_W L_i comes from a backward of L_i to W only; since w_i is a scalar
    factor, d G_i / d w_i = ||grad_W L_i|| exactly, so no double backward is needed. L_i(0): the first update's
    losses. The update comes after the model's (with the weights w(t) the model used), on applied steps only."""

    per_task_gradients = True

    def __init__(self, n_tasks: int, alpha: float, lr: float, cfg: Config, device):
        self.alpha, self.n, self.cfg = alpha, n_tasks, cfg
        self.w = torch.ones(n_tasks, device=device, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr)
        self.initial: Optional[torch.Tensor] = None
        self.pending, self.step_log = None, {}

    def update(self, losses: torch.Tensor, norms: torch.Tensor) -> None:
        """One step of eq. 1-2 from the task losses L_i(t) (T,) and ||grad_W L_i|| (T,), then renormalisation."""
        if self.initial is None:
            self.initial = losses.detach().clone()
        g = self.w * norms  # (T,) G_i
        ratio = losses / self.initial
        target = (g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        l_grad = (g - target).abs().sum()
        self.opt.zero_grad()
        self.w.grad = torch.autograd.grad(l_grad, self.w)[0]
        self.opt.step()
        with torch.no_grad():
            self.w.mul_(self.n / self.w.sum())

    def backward(self, tasks: dict, aux: Sequence[torch.Tensor], params: Sequence[torch.Tensor], masks: list,
                 um=None) -> None:
        idx = last_layer_parameters(um, params)
        w_masks = [masks[i] for i in idx]
        if not any(bool(m.any()) for m in w_masks):
            raise ValueError("train.mtl gradnorm: the last adapted layer has no parameter both tasks reach")
        norms = []
        for loss in tasks.values():
            g = task_gradients(loss, [params[i] for i in idx])
            norms.append(torch.cat([x[m] for x, m in zip(g, w_masks)]).norm())
        w = self.w.detach()
        total = sum(wi * loss for wi, loss in zip(w, tasks.values()))
        add_grads(params, task_gradients(sum([total] + [a for a in aux if a.requires_grad]), params))
        self.pending = (global_values(tasks, self.cfg), torch.stack(norms))
        self.step_log = {f"w_{k}": float(x) for k, x in zip(tasks, w)}
        self.step_log.update({f"gn_norm_{k}": float(x) for k, x in zip(tasks, norms)})

    def after_step(self, new_parts: Callable) -> None:
        self.update(*self.pending)

    def state_dict(self) -> dict:
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict(), "initial": self.initial}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])
        self.initial = state["initial"]


# --------------------------------------------------------------------------------------------- FAMO
class FAMO:
    """train.mtl: famo (Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS, arXiv 2306.03792,
    Alg. 1; official code Cranial-XIX/FAMO famo.py and experiments/*/trainer.py). Logits xi (init 0), z = softmax(xi);
    with D_i = L_i - min_i + eps (min_i = 0, eps = 1e-8, as the official code) the model trains on

        sum_i z_i log D_i / c,  c = sum_i z_i / D_i (detached)
        i.e. on sum_i a_i L_i with a_i = z_i / (c D_i) constants (the same gradient; sum_i a_i = 1)

    and after the update, with delta_i = log D_i(theta_t) - log D_i(theta_{t+1}), xi takes one Adam step
    (train.famo_lr, weight_decay train.famo_gamma: the paper's gamma xi term) on the gradient J_softmax(xi)^T delta.
    The weighted-sum form lets the a_i come from the global loss values under DDP while the gradient keeps
    info_nce_loss's DDP factor. L(theta_{t+1}), train.famo_delta: "same_batch" (default) a forward without grad on
    the step's batch after the update, as every official supervised trainer does (one extra forward, no extra
    backward); "next_step" the next step's losses on its own batch (the official toy trainer's order; no extra
    forward, delta then mixes two batches)."""

    per_task_gradients = False
    EPS = 1e-8

    def __init__(self, n_tasks: int, lr: float, gamma: float, delta: str, cfg: Config, device):
        self.cfg, self.delta = cfg, delta
        self.xi = torch.zeros(n_tasks, device=device, requires_grad=True)
        self.opt = torch.optim.Adam([self.xi], lr=lr, weight_decay=gamma)
        self.min = torch.zeros(n_tasks, device=device)
        self.prev: Optional[torch.Tensor] = None
        self.step_log = {}

    def weights(self, values: torch.Tensor) -> torch.Tensor:
        """(T,) a_i = z_i / (c D_i) from the loss values (T,)."""
        z = F.softmax(self.xi.detach(), -1)
        d = values - self.min + self.EPS
        return z / d / (z / d).sum()

    def update(self, new_values: torch.Tensor) -> None:
        """xi's step from delta = log D(theta_t) - log D(theta_{t+1}) (self.prev: the losses at theta_t)."""
        delta = (self.prev - self.min + self.EPS).log() - (new_values - self.min + self.EPS).log()
        with torch.enable_grad():
            grad = torch.autograd.grad(F.softmax(self.xi, -1), self.xi, grad_outputs=delta.detach())[0]
        self.opt.zero_grad()
        self.xi.grad = grad
        self.opt.step()

    def task_weights(self, parts: dict) -> dict:
        """losses.total_loss's task_weights: {"emb": a_emb, "rank": a_rank} for this step's losses."""
        values = global_values(parts, self.cfg)
        if self.delta == "next_step" and self.prev is not None:
            self.update(values)
        a = self.weights(values)
        self.prev = values
        z = F.softmax(self.xi.detach(), -1)
        self.step_log = {"w_emb": float(a[0]), "w_rank": float(a[1]), "z_emb": float(z[0]), "z_rank": float(z[1])}
        return {"emb": a[0], "rank": a[1]}

    def after_step(self, new_parts: Callable) -> None:
        if self.delta == "same_batch":
            self.update(global_values(new_parts(), self.cfg))

    def state_dict(self) -> dict:
        return {"xi": self.xi.detach().clone(), "opt": self.opt.state_dict(), "prev": self.prev}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.xi.copy_(state["xi"])
        self.opt.load_state_dict(state["opt"])
        self.prev = state["prev"]


def build_method(cfg: Config, device):
    """train.mtl -> None (the plain weighted sum), PCGrad, GradNorm or FAMO over the two tasks."""
    t = cfg.train
    n = len(TASK_WEIGHT_KEYS)
    if t.mtl == "pcgrad":
        return PCGrad()
    if t.mtl == "gradnorm":
        return GradNorm(n, t.gradnorm_alpha, t.gradnorm_lr if t.gradnorm_lr is not None else t.lr, cfg, device)
    if t.mtl == "famo":
        return FAMO(n, t.famo_lr, t.famo_gamma, t.famo_delta, cfg, device)
    return None
