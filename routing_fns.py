"""The routing functions: scores z (..., E) -> expert weights on the last dim.

Routing functions map scores z (..., E) to expert weights on the last dim. They are pure, differentiable and
computed in at least fp32: a half or bf16 input is upcast and the result is returned in fp32 (a float64 input
stays float64, which is what gradcheck needs). Names and references:

    softmax(z)                dense
    topk_softmax(z, k)        softmax over the k largest scores, 0 elsewhere (Shazeer et al. 2017)
                              (bias: loss-free balancing's selection by softmax(z) + b, Wang et al. 2024)
    sparsemax(z)              Euclidean projection onto the simplex (Martins & Astudillo 2016)
    sparsegen_lin(z, lam)     sparsemax(z / (1 - lam)), lam < 1 (Laha et al. 2018; LD-MoLE predicts lam)
    entmax15(z)               1.5-entmax, exact sort-based (Peters et al. 2019)
    entmax_bisect(z, alpha)   alpha-entmax by bisection for any alpha > 1
    dynmole_hybrid(z, ...)    DynMoLE: normalised Tsallis entropy (q = 1.1) above a threshold -> all experts,
                              else the experts with cumulative mass <= top_p, at least top-k; the softmax weights
                              are NOT renormalised (mikecovlee/DynMoLE, _dynamic_routing)

bias (E,), where a function takes it: auxiliary-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664,
Eq. 3; DeepSeek-V3 inference/model.py Gate): b is added to the gating scores s = softmax(z) for the SELECTION of
the experts only; the weights of the selected experts come from the unbiased scores, as the function computes them.
"""
from __future__ import annotations

from typing import Optional

import torch

ROUTING_FNS = ("softmax", "topk", "sparsemax", "sparsegen", "entmax15", "entmax_bisect", "dynmole")
DYNMOLE_EPS = 1e-5  # DynMoLE adds it to p inside its Tsallis entropy (moe_utils.tsallis_entropy, entropy_eps)


def upcast(z: torch.Tensor) -> torch.Tensor:
    """Upcast to the compute dtype: fp32, or float64 when given float64."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


# --------------------------------------------------------------------------------------------- routing functions
def softmax(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(upcast(z), dim=-1)


def topk_indices(z: torch.Tensor, k: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., k) indices of the selected experts: the k largest scores z, or, with a loss-free-balance bias b (E,),
    the k largest s_i + b_i with s = softmax(z) (Wang et al. 2024 Eq. 3: TopK({s_j + b_j}, K); the bias is added
    to the gating scores after the score function, as DeepSeek-V3's Gate). Ties broken by torch.topk."""
    z = upcast(z)
    if bias is None:
        return z.topk(k, dim=-1).indices
    return (torch.softmax(z, dim=-1) + bias.to(z.dtype)).topk(k, dim=-1).indices


def topk_softmax(z: torch.Tensor, k: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax over the k selected scores (topk_indices), zeros elsewhere:

        w_i = exp(z_i) / sum_{j in S} exp(z_j) for i in S, 0 elsewhere
    The selection S may use a loss-free-balance bias; the weights never do (they are the unbiased softmax scores of
    the selected experts, renormalised over S, which is what softmax over their logits is)."""
    z = upcast(z)
    if k >= z.shape[-1]:
        return torch.softmax(z, dim=-1)
    idx = topk_indices(z, k, bias)
    return torch.zeros_like(z).scatter(-1, idx, torch.softmax(z.gather(-1, idx), dim=-1))


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
    return _Sparsemax.apply(upcast(z))


def sparsegen_lin(z: torch.Tensor, lam) -> torch.Tensor:
    """Sparsegen-lin = sparsemax(z / (1 - lam)); lam < 1, a float or a tensor broadcastable to z (..., 1).

    lam -> 1 gives one-hot, lam = 0 sparsemax, lam -> -inf uniform. Differentiable in z and in a tensor lam.
    """
    if not torch.is_tensor(lam) and lam >= 1:
        raise ValueError(f"sparsegen_lin: lam must be < 1, got {lam}")
    z = upcast(z)
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
    return _Entmax15.apply(upcast(z))


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
    return _EntmaxBisect.apply(upcast(z), float(alpha), int(n_iter))


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
                 q: float = 1.1, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DynMoLE's expert mask (..., E) bool on routing probabilities p, as mikecovlee/DynMoLE _dynamic_routing:

        sort p descending; keep expert j (in that order) iff cumsum_{i<=j} p_(i) <= top_p  (its own mass included)
        keep the first min_k of the order in any case (keep_top_k)
        if threshold < 1: keep every expert where the normalised Tsallis entropy S_q(p + 1e-5) > threshold
    Ties are ordered by torch.sort (as in the reference).

    bias (E,): loss-free balancing carried over to top-p (our rule; the paper defines top-K only): the ORDER is that
    of the biased scores p + b, the cumulative mass still that of the unbiased p (the weights the kept experts get),
    and the entropy test is on p. b = 0 gives the plain mask exactly (p + 0 is p).
    """
    order = p if bias is None else p + bias.to(p.dtype)
    idx = order.sort(dim=-1, descending=True).indices
    ps = p.gather(-1, idx)
    keep_sorted = ps.cumsum(-1) <= top_p
    keep_sorted[..., :min_k] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    if threshold < 1:  # the reference broadcasts only for entropy_threshold < 1
        keep = keep | (tsallis_entropy(p, q, eps=DYNMOLE_EPS) > threshold)[..., None]
    return keep


def dynmole_hybrid(z: torch.Tensor, top_p: float = 0.75, min_k: int = 2, threshold: float = 0.9,
                   q: float = 1.1, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DynMoLE hybrid routing: p = softmax(z), w = p * dynmole_keep(p) (see there; bias: loss-free balancing's
    selection only).

    The kept weights are NOT renormalised (they sum to <= 1), as the reference multiplies p by its mask.
    Reference defaults: top_p 0.75, keep_top_k 2, entropy_threshold 0.9, entropy_index q 1.1 (DynMoleConfig).
    """
    p = softmax(z)
    return p * dynmole_keep(p, top_p, min_k, threshold, q, bias)
