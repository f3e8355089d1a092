"""Routing for the MoE-LoRA experts: pure routing functions, auxiliary losses, and the router modules.

Routing functions map scores z (..., E) to expert weights on the last dim. They are pure, differentiable and
computed in at least fp32: a half or bf16 input is upcast and the result is returned in fp32 (a float64 input
stays float64, which is what gradcheck needs). Names and references:

    softmax(z)                dense
    topk_softmax(z, k)        softmax over the k largest scores, 0 elsewhere (Shazeer et al. 2017)
    sparsemax(z)              Euclidean projection onto the simplex (Martins & Astudillo 2016)
    sparsegen_lin(z, lam)     sparsemax(z / (1 - lam)), lam < 1 (Laha et al. 2018; LD-MoLE predicts lam)
    entmax15(z)               1.5-entmax, exact sort-based (Peters et al. 2019)
    entmax_bisect(z, alpha)   alpha-entmax by bisection for any alpha > 1
    dynmole_hybrid(z, ...)    DynMoLE: normalised Tsallis entropy (q = 1.1) above a threshold -> all experts,
                              else the experts with cumulative mass <= top_p, at least top-k; the softmax weights
                              are NOT renormalised (mikecovlee/DynMoLE, _dynamic_routing)

Auxiliary losses (each a scalar, padding excluded by an optional mask), by their names in AUX_LOSSES:
    load_balance      Switch N * sum_i f_i P_i; for fn dynmole DynMoLE's own f (mean of the kept weights, pooled
                      over layers); for LD-MoLE its own f (share of all expert activations)
    z_loss            ST-MoE mean logsumexp^2
    entropy           mean Shannon entropy of the routing distribution
    tsallis           DynMoLE's mean normalised Tsallis entropy (q = router.tsallis_q) of the routing distribution
    lambda_sparsity   LD-MoLE's analytical sparsity loss mean relu(lower_k - lambda) (lambda predictor only)
    lambda_mean       LD-MoLE's mean (1 - lambda) (lambda predictor only)
A LearnedRouter computes the ones its config lists (and that apply to its fn) in training mode, with or without grad
(GradCache's no-grad representation pass gives the step's statistics; a checkpoint recompute must replay the same
ops), and under grad; it skips them in eval mode under no_grad (inference). It returns them as
AuxStat sufficient statistics (sums and unit counts), not as finished means, so the trainer can finalise each loss
over any union of units: the query, document and pair calls of one optimizer step together, and all ranks
(Switch's batch; Qwen's global-batch balancing, arXiv 2501.11873).

Routers (nn.Modules built by moe_lora.attach from RouterConfig): TaskRouter (fixed weights from task ids: Hard-Switch
one-hot, or multi-hot), LearnedRouter (linear or learnable-prototype scores on the pooled or per-token block input,
optional task embedding, LD-MoLE lambda predictor, temperature at train and eval, training-only jitter) and
RetrieverRouter (RouterRetriever: the input embedded by the frozen base, top-1 over pilot embeddings, untrained).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTING_FNS = ("softmax", "topk", "sparsemax", "sparsegen", "entmax15", "entmax_bisect", "dynmole")
AUX_LOSSES = ("load_balance", "z_loss", "entropy", "tsallis", "lambda_sparsity", "lambda_mean")
ROUTER_KINDS = ("task", "learned", "retriever")
DYNMOLE_EPS = 1e-5  # DynMoLE adds it to p inside its Tsallis entropy (moe_utils.tsallis_entropy, entropy_eps)
LDMOLE_EPS = 1e-2  # LD-MoLE: lambda = logsigmoid(MLP(x)) + 1 - eps (GlobalSparsegen eps)


def _up(z: torch.Tensor) -> torch.Tensor:
    """Upcast to the compute dtype: fp32, or float64 when given float64."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


# --------------------------------------------------------------------------------------------- routing functions
def softmax(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(_up(z), dim=-1)


def topk_softmax(z: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the k largest scores, zeros elsewhere (ties broken by torch.topk)."""
    z = _up(z)
    if k >= z.shape[-1]:
        return torch.softmax(z, dim=-1)
    vals, idx = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, torch.softmax(vals, dim=-1))


class _Sparsemax(torch.autograd.Function):
    """p = max(z - tau, 0) with tau such that sum p = 1; Jacobian diag(s) - s s^T / |S| on the support S."""

    @staticmethod
    def forward(ctx, z):
        zs = z.sort(dim=-1, descending=True).values
        cums = zs.cumsum(-1) - 1
        rho = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        k = (rho * zs > cums).sum(-1, keepdim=True)  # support size, >= 1 (the largest score is always in)
        tau = cums.gather(-1, k - 1) / k
        p = (z - tau).clamp(min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        s = (p > 0).to(g.dtype)
        v = (g * s).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
        return (g - v) * s


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    return _Sparsemax.apply(_up(z))


def sparsegen_lin(z: torch.Tensor, lam) -> torch.Tensor:
    """Sparsegen-lin = sparsemax(z / (1 - lam)); lam < 1, a float or a tensor broadcastable to z (..., 1).

    lam -> 1 gives one-hot, lam = 0 sparsemax, lam -> -inf uniform. Differentiable in z and in a tensor lam.
    """
    if not torch.is_tensor(lam) and lam >= 1:
        raise ValueError(f"sparsegen_lin: lam must be < 1, got {lam}")
    z = _up(z)
    return sparsemax(z / (1 - (lam.to(z.dtype) if torch.is_tensor(lam) else lam)))


class _Entmax15(torch.autograd.Function):
    """p = max(z/2 - tau, 0)^2, exact: for each candidate support size k (scores sorted) tau solves
    sum_{j<=k} (x_j - tau)^2 = 1 with x = z/2; the support is the largest k with tau_k <= x_k."""

    @staticmethod
    def forward(ctx, z):
        x = z / 2
        x = x - x.max(dim=-1, keepdim=True).values  # shift-invariant; keeps the squares small
        xs = x.sort(dim=-1, descending=True).values
        rho = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        mean = xs.cumsum(-1) / rho
        mean_sq = (xs * xs).cumsum(-1) / rho
        ss = rho * (mean_sq - mean * mean)  # sum of squared deviations of the top k
        tau = mean - ((1 - ss) / rho).clamp(min=0).sqrt()
        k = (tau <= xs).sum(-1, keepdim=True)
        p = (x - tau.gather(-1, k - 1)).clamp(min=0).square()
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return _entmax_vjp(p, g, 1.5)


def _entmax_vjp(p: torch.Tensor, g: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha-entmax Jacobian-vector product: J = diag(s) - s s^T / sum s with s = p^(2 - alpha) on the support."""
    s = torch.where(p > 0, p.pow(2 - alpha), torch.zeros_like(p))
    gs = g * s
    return gs - s * (gs.sum(-1, keepdim=True) / s.sum(-1, keepdim=True))


def entmax15(z: torch.Tensor) -> torch.Tensor:
    return _Entmax15.apply(_up(z))


class _EntmaxBisect(torch.autograd.Function):
    """p_i = max((alpha - 1) z_i - tau, 0)^(1 / (alpha - 1)); tau found by bisection on sum p = 1.

    tau lies in [max - 1, max - d^(1 - alpha)] (max of (alpha - 1) z): at the low end the largest p alone is 1, at the
    high end every p is at most 1/d. Each step halves the bracket; the result is renormalised to sum to 1.
    """

    @staticmethod
    def forward(ctx, z, alpha: float, n_iter: int):
        x = z * (alpha - 1)
        mx = x.max(dim=-1, keepdim=True).values
        lo, hi = mx - 1, mx - z.shape[-1] ** (1 - alpha)
        inv = 1 / (alpha - 1)
        for _ in range(n_iter):
            mid = (lo + hi) / 2
            above = (x - mid).clamp(min=0).pow(inv).sum(-1, keepdim=True) >= 1  # sum decreases in tau
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        p = (x - lo).clamp(min=0).pow(inv)
        p = p / p.sum(-1, keepdim=True)
        ctx.alpha = alpha
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return _entmax_vjp(p, g, ctx.alpha), None, None


def entmax_bisect(z: torch.Tensor, alpha: float = 1.5, n_iter: int = 50) -> torch.Tensor:
    """alpha-entmax for a float alpha >= 1 (1 = softmax, 2 = sparsemax, 1.5 = entmax15); differentiable in z only."""
    if alpha < 1:
        raise ValueError(f"entmax_bisect: alpha must be >= 1, got {alpha}")
    if alpha == 1:
        return softmax(z)
    return _EntmaxBisect.apply(_up(z), float(alpha), int(n_iter))


def tsallis_entropy(p: torch.Tensor, q: float = 1.1, normalize: bool = True,
                    eps: float = DYNMOLE_EPS) -> torch.Tensor:
    """S_q(p) = (1 - sum (p + eps)^q) / (q - 1) on the last dim; normalize divides by its maximum
    (1 - n^(1 - q)) / (q - 1) (the uniform p, eps 0), to about [0, 1].

    eps: by default DYNMOLE_EPS, as DynMoLE evaluates it on p + eps (moe_peft/common/moe_utils.py, tsallis_entropy);
    eps = 0 gives the plain S_q.
    """
    s = (1 - (p + eps).pow(q).sum(-1)) / (q - 1)
    if normalize:
        n = p.shape[-1]
        s = s / ((1 - n ** (1 - q)) / (q - 1)) if n > 1 else torch.zeros_like(s)
    return s


def dynmole_keep(p: torch.Tensor, top_p: float = 0.75, min_k: int = 2, threshold: float = 0.9,
                 q: float = 1.1) -> torch.Tensor:
    """DynMoLE's expert mask (..., E) bool on routing probabilities p, as mikecovlee/DynMoLE _dynamic_routing:

        sort p descending; keep expert j (in that order) iff cumsum_{i<=j} p_(i) <= top_p  (its own mass included)
        keep the first min_k of the order in any case (keep_top_k)
        if threshold < 1: keep every expert where the normalised Tsallis entropy S_q(p + 1e-5) > threshold
    Ties are ordered by torch.sort (as in the reference).
    """
    ps, idx = p.sort(dim=-1, descending=True)
    keep_sorted = ps.cumsum(-1) <= top_p
    keep_sorted[..., :min_k] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    if threshold < 1:  # the reference broadcasts only for entropy_threshold < 1
        keep = keep | (tsallis_entropy(p, q, eps=DYNMOLE_EPS) > threshold)[..., None]
    return keep


def dynmole_hybrid(z: torch.Tensor, top_p: float = 0.75, min_k: int = 2, threshold: float = 0.9,
                   q: float = 1.1) -> torch.Tensor:
    """DynMoLE hybrid routing: p = softmax(z), w = p * dynmole_keep(p) (see there).

    The kept weights are NOT renormalised (they sum to <= 1), as the reference multiplies p by its mask.
    Reference defaults: top_p 0.75, keep_top_k 2, entropy_threshold 0.9, entropy_index q 1.1 (DynMoleConfig).
    """
    p = softmax(z)
    return p * dynmole_keep(p, top_p, min_k, threshold, q)


# --------------------------------------------------------------------------------------------- auxiliary losses
@dataclass
class AuxStat:
    """Sufficient statistics of one auxiliary loss over a set of routed units (sequences, or non-pad tokens).

    Mean-type losses (z_loss, entropy, ...): `total` = sum over the units of the per-unit value (scalar, with grad).
    Load balance: `total` = (E,) sum over the units of the router probabilities (with grad) and `dispatch` = (E,) sum
    of the units' dispatch fractions (no grad; DynMoLE's f is the kept weights and carries grad, as its reference).
    `count` = number of units. Stats of disjoint unit sets add up (+), and finalize() turns the sum into the loss
    over their union: a mean, or N * sum_i f_i P_i with f_i = dispatch_i / count (per-unit fractions), or
    f_i = dispatch_i / sum_j dispatch_j when f_over_activations (dispatch = activation counts: LD-MoLE).
    pool_layers: the trainer sums the layers' stats and finalises once over layers x units (DynMoLE's loss over the
    concatenated router logits of all layers) instead of averaging the per-layer losses (losses.aux_losses).
    """
    total: torch.Tensor
    count: torch.Tensor
    dispatch: Optional[torch.Tensor] = None
    dispatch_grad: bool = False  # f is differentiable (DynMoLE): GradCache and the DDP sum must keep its gradient
    pool_layers: bool = False  # one loss over all layers' units (DynMoLE), not the mean of per-layer losses
    f_over_activations: bool = False  # f_i = dispatch_i / sum_j dispatch_j (LD-MoLE), not dispatch_i / count

    def __add__(self, other: "AuxStat") -> "AuxStat":
        if (self.dispatch is None) != (other.dispatch is None):
            raise ValueError("AuxStat: cannot add a load-balance stat to a mean-type stat")
        if self.f_over_activations != other.f_over_activations:
            raise ValueError("AuxStat: cannot add load-balance stats with different f normalisations")
        return AuxStat(self.total + other.total, self.count + other.count,
                       None if self.dispatch is None else self.dispatch + other.dispatch,
                       self.dispatch_grad or other.dispatch_grad, self.pool_layers or other.pool_layers,
                       self.f_over_activations)

    def finalize(self) -> torch.Tensor:
        n = self.count.clamp(min=1)
        if self.dispatch is None:
            return self.total / n
        f_norm = self.dispatch.sum().clamp(min=1) if self.f_over_activations else n
        return self.total.shape[-1] * ((self.dispatch / f_norm) * (self.total / n)).sum()


def finalize_over_layers(stats: list) -> torch.Tensor:
    """One aux loss from its per-layer AuxStats: the mean of the per-layer losses, or, where the stat says pool_layers
    (DynMoLE's load balance: the reference concatenates all layers' router logits, mikecovlee/DynMoLE
    moe_peft/model.py unpack_router_logits), the loss of the layers' summed stats, over layers x units at once."""
    if stats[0].pool_layers:
        return sum(stats[1:], stats[0]).finalize()
    return torch.stack([st.finalize() for st in stats]).mean()


def _unit_sum(x: torch.Tensor, mask: Optional[torch.Tensor], event_dims: int) -> tuple:
    """(sum of x over its unit dims, number of units), counting only units where mask == 1."""
    if mask is None:
        flat = x.reshape(-1, *x.shape[x.dim() - event_dims:])
        return flat.sum(0), torch.tensor(float(flat.shape[0]), device=x.device)
    m = mask.to(x.dtype).reshape(*mask.shape, *([1] * event_dims))
    dims = tuple(range(mask.dim()))
    return (x * m).sum(dims), mask.to(x.dtype).sum()


def _dispatch_fractions(probs: torch.Tensor, dispatch: Optional[torch.Tensor]) -> torch.Tensor:
    """(..., N) fraction of each unit sent to each expert: the argmax (Switch top-1) or `dispatch` split evenly."""
    if dispatch is None:
        return F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
    dispatch = dispatch.to(probs.dtype)
    return dispatch / dispatch.sum(-1, keepdim=True).clamp(min=1)


def load_balance_stat(probs: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      dispatch: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of switch_load_balance: finalize() of the sum over unit sets is the loss over their union."""
    probs = _up(probs)
    f, count = _unit_sum(_dispatch_fractions(probs, dispatch).detach(), mask, 1)
    P, _ = _unit_sum(probs, mask, 1)
    return AuxStat(P, count, f)


def mean_stat(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of a mean-type loss from its per-unit values (...,)."""
    total, count = _unit_sum(_up(values), mask, 0)
    return AuxStat(total, count)


def dynmole_load_balance_stat(probs: torch.Tensor, weights: torch.Tensor,
                              mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of DynMoLE's load balance N * sum_i f_i P_i (mikecovlee/DynMoLE, _dynamic_load_balancing_loss_func):
    f_i = mean over the units of the routed weights w_i = p_i * keep_i (not a dispatch count, and with grad, as the
    reference does not detach it), P_i = mean of the softmax probabilities p_i; padding excluded by mask.
    Pooled over layers (pool_layers): the reference concatenates every layer's router logits (moe_peft/model.py,
    unpack_router_logits) and takes f and P once over layers x tokens, so losses.aux_losses sums the layers' stats."""
    probs, weights = _up(probs), _up(weights)
    f, count = _unit_sum(weights, mask, 1)
    P, _ = _unit_sum(probs, mask, 1)
    return AuxStat(P, count, f, dispatch_grad=True, pool_layers=True)


def ldmole_load_balance_stat(weights: torch.Tensor, mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of LD-MoLE's load balance N * sum_i f_i P_i (eshentw/LD-MoLE loss/loss.py, LoadBalancingLoss._forward):

        f_i = sum_t 1[w_ti > 0] / sum_t k_t   (k_t = number of experts unit t activates: a share of all activations)
        P_i = sum_t w_ti / T                  (mean sparsegen weight)
    over the non-pad units t of weights (..., N), f without grad (the reference counts with sign()). Unlike Switch's
    per-unit split (1/k_t to each chosen expert), a unit that activates more experts counts more. Per layer, then
    averaged over layers, as the reference (LoadBalancingLoss.forward)."""
    weights = _up(weights)
    c, count = _unit_sum((weights > 0).to(weights.dtype), mask, 1)
    P, _ = _unit_sum(weights, mask, 1)
    return AuxStat(P, count, c, f_over_activations=True)


def tsallis_stat(probs: torch.Tensor, q: float = 1.1, mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of DynMoLE's entropy loss: mean over the units of the normalised Tsallis entropy S_q(p + 1e-5)
    (mikecovlee/DynMoLE: entropy_loss = router_entropy.mean(), weight router_dyn_loss_coef = 0.01). The reference
    averages over every token row, padding included; here padding is excluded like every other aux loss."""
    return mean_stat(tsallis_entropy(_up(probs), q, eps=DYNMOLE_EPS), mask)


def lambda_lower_bound(u: torch.Tensor, k: int = 2) -> torch.Tensor:
    """LD-MoLE's lower_k (eshentw/LD-MoLE loss/loss.py, lambda_interval_k): with u sorted descending,

        lower_k = 1 - (sum_{j<=k} u_(j) - k * u_(k+1))
    sparsegen_lin(u, lambda) keeps at most k experts iff lambda >= lower_k. u is detached (the bound is a target).
    With E <= k experts any lambda keeps at most k: the bound is -inf (the loss below is then 0).
    """
    u = _up(u).detach()
    if u.shape[-1] <= k:
        return torch.full(u.shape[:-1], -math.inf, dtype=u.dtype, device=u.device)
    us = u.sort(dim=-1, descending=True).values
    return 1.0 - (us[..., :k].sum(-1) - k * us[..., k])


def lambda_sparsity_stat(u: torch.Tensor, lam: torch.Tensor, k: int = 2,
                         mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of LD-MoLE's analytical sparsity loss mean relu(lower_k(u) - lambda) over the units
    (loss/loss.py RegularizationLoss, k = 2; weight reg_loss_coef). u: the scores fed to sparsegen (..., E);
    lam: (..., 1) as the LambdaPredictor gives it."""
    lam = _up(lam).squeeze(-1)
    return mean_stat(torch.relu(lambda_lower_bound(u, k) - lam), mask)


def lambda_mean_stat(lam: torch.Tensor, mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of LD-MoLE's mean (1 - lambda) over the units (loss/loss.py LamSparseLoss; weight lam_loss_coef):
    minimising it raises lambda, i.e. sparser routing."""
    return mean_stat(1 - _up(lam).squeeze(-1), mask)


def switch_load_balance(probs: torch.Tensor, mask: Optional[torch.Tensor] = None,
                        dispatch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer load balance N * sum_i f_i P_i over the units (sequences or tokens) of probs (..., N).

    P_i: mean router probability of expert i; f_i: fraction of units dispatched to i, from `dispatch` (..., N) 0/1
    (each unit split evenly over its chosen experts) or, by default, the argmax of probs (Switch's top-1). mask (...)
    excludes padding. Perfect balance gives 1.
    """
    return load_balance_stat(probs, mask, dispatch).finalize()


def z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over units of logsumexp(logits)^2."""
    return z_loss_stat(logits, mask).finalize()


def z_loss_stat(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> AuxStat:
    return mean_stat(torch.logsumexp(_up(logits), dim=-1).square(), mask)


def entropy(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean Shannon entropy -sum p log p (0 log 0 = 0) of the routing distribution; the trainer picks the sign."""
    return entropy_stat(probs, mask).finalize()


def entropy_stat(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> AuxStat:
    p = _up(probs)
    h = -(p * p.clamp(min=torch.finfo(p.dtype).tiny).log()).sum(-1)  # finite gradient where a sparse map gives 0
    return mean_stat(h, mask)


# --------------------------------------------------------------------------------------------- config
@dataclass
class RouterConfig:
    """How the routed experts' weights are computed. Plain types only: the YAML `router:` section, filled 1:1 by
    config.py (which fills kind and task_experts from train.mode: config.resolve_mode)."""
    # "task": fixed weights from task ids (Hard-Switch) | "learned" | "retriever": RouterRetriever (pilot embeddings)
    kind: str = "learned"
    tasks: list = field(default_factory=lambda: ["embed", "rerank"])  # task_ids index this list
    # kind "task": each task's experts. kind "retriever": an expert's pilot embedding is built from the inputs of the
    # tasks that list it (an expert listed by both tasks, e.g. a routed shared one, gets both tasks' inputs)
    task_experts: dict = field(default_factory=lambda: {"embed": ["embed"], "rerank": ["rerank"]})
    fn: str = "softmax"  # one of ROUTING_FNS
    top_k: int = 2  # topk: k; dynmole: at least k experts
    alpha: float = 1.5  # entmax_bisect
    lam: float = 0.0  # sparsegen: fixed lambda (< 1) when lambda_predictor is off
    lambda_predictor: bool = False  # sparsegen: LD-MoLE's lambda = f(x), a small MLP, lambda < 1
    # LD-MoLE lambda-MLP width: 64 is UniversalMLP's code default; the reference's model configs set hidden_sizes 128
    # for Qwen3-0.6B / Llama-3.2-1B, 256 for 1.7B / 3B, 512 for Llama-3.1-8B (conf/model/*.yaml; its run.sh passes 512)
    lambda_hidden: int = 64
    lambda_shared: bool = True  # one lambda predictor for all layers (LD-MoLE's GlobalSparsegen) | False: per layer
    sparsity_k: int = 2  # lambda_sparsity aux loss: at most this many experts (reference lambda_interval_k, k = 2)
    top_p: float = 0.75  # dynmole
    entropy_threshold: float = 0.9  # dynmole: normalised Tsallis entropy above this -> all experts
    tsallis_q: float = 1.1  # dynmole
    # "linear": W h + b | "prototype": scale * cos(h, prototype_i), one learnable prototype per expert (random
    # init, trained with the rest; not RouterRetriever, which is kind "retriever")
    scorer: str = "linear"
    prototype_scale: float = 10.0
    retriever_score: str = "dot"  # kind "retriever": "dot" (the reference's default score_function) | "cos"
    pilot_examples: int = 256  # kind "retriever": training examples whose inputs build the pilot embeddings
    granularity: str = "sequence"  # "sequence": weights (B, E) from the pooled input | "token": (B, T, E)
    pooling: str = "mean"  # sequence granularity: "mean" over non-pad tokens | "last" token
    per_layer: bool = True  # False: one router, evaluated at the first adapted layer, for all layers
    task_embed_dim: int = 0  # > 0: a learned task embedding is concatenated to the router input
    normalize_input: bool = True  # parameter-free RMS norm of the router input (the block input is un-normed)
    jitter: float = 0.0  # training only: router input scaled by U(1 - jitter, 1 + jitter) (Switch)
    temperature: float = 1.0  # scores divided by it, at train and eval alike (one router function)
    # computed when grad is enabled, each where it applies (tsallis: any learned router; lambda_*: lambda predictor)
    aux_losses: list = field(default_factory=lambda: list(AUX_LOSSES))

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"router.{name}: {why} (got {getattr(self, name)!r})")

        if self.kind not in ROUTER_KINDS:
            bad("kind", f"must be one of {', '.join(ROUTER_KINDS)}")
        if self.fn not in ROUTING_FNS:
            bad("fn", f"must be one of {', '.join(ROUTING_FNS)}")
        if self.scorer == "similarity":
            bad("scorer", "'similarity' is now 'prototype' (learnable prototypes); RouterRetriever is kind 'retriever'")
        if self.scorer not in ("linear", "prototype"):
            bad("scorer", "must be 'linear' or 'prototype'")
        if self.retriever_score not in ("dot", "cos"):
            bad("retriever_score", "must be 'dot' or 'cos'")
        if self.kind == "retriever" and self.granularity != "sequence":
            bad("granularity", "kind 'retriever' routes whole inputs: must be 'sequence'")
        if self.pilot_examples < 1 or self.sparsity_k < 1:
            bad("pilot_examples" if self.pilot_examples < 1 else "sparsity_k", "must be >= 1")
        if self.granularity not in ("sequence", "token"):
            bad("granularity", "must be 'sequence' or 'token'")
        if self.pooling not in ("mean", "last"):
            bad("pooling", "must be 'mean' or 'last'")
        if not isinstance(self.tasks, list) or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            bad("tasks", "must be a non-empty list of distinct names")
        if not isinstance(self.task_experts, dict):
            bad("task_experts", "must map task name -> list of expert names")
        if self.kind == "task":
            missing = [t for t in self.tasks if not self.task_experts.get(t)]
            if missing:
                bad("task_experts", f"kind 'task' needs a non-empty expert list for every task; missing {missing}")
        if self.top_k < 1:
            bad("top_k", "must be >= 1")
        if self.alpha < 1:
            bad("alpha", "must be >= 1")
        if self.lam >= 1:
            bad("lam", "must be < 1")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.entropy_threshold <= 0:
            bad("entropy_threshold", "must be > 0 (the normalised Tsallis entropy lies in about [0, 1]: at 0 or "
                                     "below nearly every unit would take all experts)")
        if self.tsallis_q <= 0 or self.tsallis_q == 1:
            bad("tsallis_q", "must be > 0 and != 1")
        if self.temperature <= 0:
            bad("temperature", "must be > 0")
        if not 0 <= self.jitter < 1:
            bad("jitter", "must be in [0, 1)")
        if self.task_embed_dim < 0 or self.lambda_hidden < 1:
            bad("task_embed_dim" if self.task_embed_dim < 0 else "lambda_hidden", "out of range")
        unknown = [a for a in self.aux_losses if a not in AUX_LOSSES]
        if unknown:
            bad("aux_losses", f"unknown {unknown}; known: {', '.join(AUX_LOSSES)}")


# --------------------------------------------------------------------------------------------- router modules
def pool(x: torch.Tensor, mask: torch.Tensor, how: str, cache: Optional[dict] = None) -> torch.Tensor:
    """Block input x (B, T, H), mask (B, T) -> (B, H) fp32: mean over non-pad tokens, or the last real token.

    cache (e.g. ctx.shared) keeps the mask-derived pooling weights / positions for the other layers of the forward.
    """
    key = f"router.pool.{how}.{x.dtype}"
    got = cache.get(key) if cache is not None else None
    if how == "last":
        if got is None:
            T = mask.shape[1]
            got = T - 1 - mask.flip(1).long().argmax(dim=1)  # (B,), left or right padding
        out = _up(x[torch.arange(x.shape[0], device=x.device), got])
    else:
        if got is None:
            m = mask.to(torch.float32)
            got = (m / m.sum(1, keepdim=True).clamp(min=1)).to(x.dtype)[:, None, :]  # (B, 1, T)
        out = _up(torch.bmm(got, x)[:, 0])  # one matmul, no (B, T, H) temporary
    if cache is not None:
        cache[key] = got
    return out


class TaskRouter(nn.Module):
    """Fixed weights from task ids: row t of `table` (n_tasks, E) is the multi-hot of task t's experts."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.float(), persistent=False)  # rebuilt from the config, never saved

    def forward(self, x: torch.Tensor, ctx):
        if ctx.task_ids is None:
            raise ValueError("router kind 'task' needs task_ids (B,) in the model call")
        return self.table[ctx.task_ids.to(self.table.device)], {}


class LambdaPredictor(nn.Module):
    """LD-MoLE sparsity factor lambda = logsigmoid(W2 relu(W1 x + b1) + b2) + 1 - eps < 1, eps = 1e-2 (any negative
    value is allowed: denser than sparsemax), as eshentw/LD-MoLE peft/utils/sparsegen.py (UniversalMLP,
    GlobalSparsegen).

    Init as the reference's default "kaiming" strategy (initialize_sparsegen_weights): both weights Kaiming-uniform
    (a = sqrt 5), both biases -2.5. Where W1 x < 2.5 elementwise the hidden layer is 0 and lambda = logsigmoid(-2.5)
    + 0.99 = -1.589 (sparsegen on z / 2.589: denser than sparsemax) at step 0.
    """
    INIT_BIAS = -2.5

    def __init__(self, in_dim: int, hidden: int = 64, eps: float = LDMOLE_EPS):
        super().__init__()
        self.eps = eps
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        for lin in (self.net[0], self.net[2]):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            nn.init.constant_(lin.bias, self.INIT_BIAS)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(self.net(h)) + (1 - self.eps)


class LearnedRouter(nn.Module):
    """Scores on the (pooled or per-token) block input -> / temperature -> routing function -> weights (B, E) or
    (B, T, E), fp32. The temperature divides the scores in training and evaluation alike.

    All parameters are fp32 whatever the base dtype. Returns (weights, aux) with aux {name: AuxStat} over the units
    (sequences, or non-pad tokens). shared_lambda: an LD-MoLE lambda predictor owned by another router (the first
    layer's, router.lambda_shared); it is held outside this module's parameters so that it is saved and optimised once.
    """

    def __init__(self, hidden_size: int, n_experts: int, cfg: RouterConfig,
                 shared_lambda: Optional[LambdaPredictor] = None):
        super().__init__()
        self.cfg = cfg
        in_dim = hidden_size + cfg.task_embed_dim
        self.task_embed = nn.Embedding(len(cfg.tasks), cfg.task_embed_dim) if cfg.task_embed_dim else None
        if cfg.scorer == "linear":
            self.proj = nn.Linear(in_dim, n_experts)
            nn.init.zeros_(self.proj.bias)
            self.prototypes = None
        else:  # one learnable prototype per expert, random at init
            self.proj = None
            self.prototypes = nn.Parameter(torch.randn(n_experts, in_dim))
        uses_lambda = cfg.fn == "sparsegen" and cfg.lambda_predictor
        self.lam = LambdaPredictor(in_dim, cfg.lambda_hidden) if uses_lambda and shared_lambda is None else None
        self._shared_lam = (shared_lambda,) if uses_lambda and shared_lambda is not None else ()  # not registered

    @property
    def lambda_predictor(self) -> Optional[LambdaPredictor]:
        return self.lam if self.lam is not None else (self._shared_lam[0] if self._shared_lam else None)

    def features(self, x: torch.Tensor, ctx) -> torch.Tensor:
        cfg = self.cfg
        h = pool(x, ctx.attention_mask, cfg.pooling, ctx.shared) if cfg.granularity == "sequence" else _up(x)
        if cfg.normalize_input:
            h = F.rms_norm(h, (h.shape[-1],), eps=1e-6)
        if self.training and cfg.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
        if self.task_embed is not None:
            if ctx.task_ids is None:
                raise ValueError("router.task_embed_dim > 0 needs task_ids (B,) in the model call")
            t = self.task_embed(ctx.task_ids.to(h.device))  # (B, d)
            if h.dim() == 3:
                t = t[:, None].expand(-1, h.shape[1], -1)
            h = torch.cat([h, t], dim=-1)
        return h

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Router features (..., D) -> scores (..., E), divided by the temperature (train and eval)."""
        cfg = self.cfg
        if self.proj is not None:
            logits = self.proj(h)
        else:
            logits = cfg.prototype_scale * F.normalize(h, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()
        return logits / cfg.temperature if cfg.temperature != 1.0 else logits

    def forward(self, x: torch.Tensor, ctx):
        cfg = self.cfg
        h = self.features(x, ctx)
        logits = self.scores(h)
        fn, lam = cfg.fn, None
        if fn == "softmax":
            w = softmax(logits)
        elif fn == "topk":
            w = topk_softmax(logits, cfg.top_k)
        elif fn == "sparsemax":
            w = sparsemax(logits)
        elif fn == "sparsegen":
            predictor = self.lambda_predictor
            lam = predictor(h) if predictor is not None else None  # (..., 1)
            w = sparsegen_lin(logits, lam if lam is not None else cfg.lam)
        elif fn == "entmax15":
            w = entmax15(logits)
        elif fn == "entmax_bisect":
            w = entmax_bisect(logits, cfg.alpha)
        else:
            w = dynmole_hybrid(logits, cfg.top_p, cfg.top_k, cfg.entropy_threshold, cfg.tsallis_q)
        # In training mode also under no_grad: GradCache's representation pass needs the step's statistics (train.py).
        aux = self.aux_stats(logits, w, lam, ctx) if cfg.aux_losses and (self.training or torch.is_grad_enabled()) \
            else {}
        return w, aux

    def aux_stats(self, logits: torch.Tensor, w: torch.Tensor, lam: Optional[torch.Tensor], ctx) -> dict:
        """{name: AuxStat} of the listed aux losses that apply to this router (see the module docstring)."""
        cfg, want = self.cfg, set(self.cfg.aux_losses)
        mask = ctx.attention_mask if w.dim() == 3 else None
        dense = cfg.fn in ("topk", "dynmole")  # P from the full softmax; the other maps use their own output
        probs = torch.softmax(_up(logits), dim=-1) if dense else w
        aux = {}
        if "load_balance" in want:
            if cfg.fn == "dynmole":
                aux["load_balance"] = dynmole_load_balance_stat(probs, w, mask)
            elif lam is not None:  # LD-MoLE (sparsegen with the lambda predictor)
                aux["load_balance"] = ldmole_load_balance_stat(w, mask)
            else:
                aux["load_balance"] = load_balance_stat(probs, mask, None if cfg.fn == "softmax" else (w > 0))
        if "z_loss" in want:
            aux["z_loss"] = z_loss_stat(logits, mask)
        if "entropy" in want:
            aux["entropy"] = entropy_stat(probs, mask)
        if "tsallis" in want:
            aux["tsallis"] = tsallis_stat(probs, cfg.tsallis_q, mask)
        if lam is not None and "lambda_sparsity" in want:
            aux["lambda_sparsity"] = lambda_sparsity_stat(logits, lam, cfg.sparsity_k, mask)
        if lam is not None and "lambda_mean" in want:
            aux["lambda_mean"] = lambda_mean_stat(lam, mask)
        return aux


class RetrieverRouter(nn.Module):
    """RouterRetriever (Lee et al., arXiv 2409.02685; amy-hyunji/RouterRetriever test.py find_expert): the input is
    embedded once by the frozen base without adapters, e (B, H) (moe_lora.base_embedding: the final-norm hidden
    states pooled by router.pooling; the reference's Contriever mean-pools), compared with one pilot embedding per
    expert, c_i = the mean base embedding of that expert's training inputs (get_pilot_embeddings.py with its default
    k = 1 KMeans cluster, i.e. the centroid), and routed top-1:

        w = one_hot(argmax_i s(e, c_i)),   s = e . c_i ("dot", the reference default) or cos(e, c_i)
    Nothing here trains: `pilots` (E, H) is a buffer (saved with the adapters), set by moe_lora.set_pilot_embeddings.
    The forward reads e from ctx.shared[BASE_EMBEDDING], written by moe_lora's prepass before the blocks run.

    Named deviations (README, router catalogue): task-centroid pilots: the reference groups its training queries by
    the expert that performs best on each and may hold several pilots per expert, routing to the expert of the
    nearest pilot (test.py find_expert; the paper's figure averages per expert); ours is one pilot per expert, the
    centroid of its tasks' inputs (identical rules with one pilot per expert). Every input routed: the reference
    routes only queries (documents are encoded by the plain base); ours routes queries, documents and pairs alike.
    """

    def __init__(self, hidden_size: int, n_experts: int, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pilots", torch.zeros(n_experts, hidden_size))  # persistent: in adapters.safetensors

    @torch.no_grad()
    def set_pilots(self, pilots: torch.Tensor) -> None:
        if pilots.shape != self.pilots.shape:
            raise ValueError(f"RouterRetriever: pilots must be {list(self.pilots.shape)}, got {list(pilots.shape)}")
        self.pilots.copy_(pilots)

    def forward(self, x: torch.Tensor, ctx):
        e = ctx.shared.get(BASE_EMBEDDING)
        if e is None:
            raise RuntimeError("RouterRetriever: the base embedding of the input is missing from ctx.shared "
                               "(call the model through CausalLM.forward with the experts attached)")
        if not bool(self.pilots.any()):
            raise RuntimeError("RouterRetriever: no pilot embeddings yet (train.py computes them from the training "
                               "data at the start of a run; see moe_lora.set_pilot_embeddings)")
        c = self.pilots
        if self.cfg.retriever_score == "cos":
            e, c = F.normalize(e, dim=-1), F.normalize(c, dim=-1)
        s = _up(e) @ c.t()  # (B, E)
        return F.one_hot(s.argmax(-1), c.shape[0]).to(s.dtype), {}


BASE_EMBEDDING = "router.base_embedding"  # ctx.shared key: (B, H) fp32 embedding of the input by the plain base
