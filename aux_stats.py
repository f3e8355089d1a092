"""The routers' auxiliary losses as sufficient statistics (AuxStat), and their finalisation.

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from routing_fns import DYNMOLE_EPS, tsallis_entropy, upcast

AUX_LOSSES = ("load_balance", "z_loss", "entropy", "tsallis", "lambda_sparsity", "lambda_mean")


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
    probs = upcast(probs)
    f, count = _unit_sum(_dispatch_fractions(probs, dispatch).detach(), mask, 1)
    P, _ = _unit_sum(probs, mask, 1)
    return AuxStat(P, count, f)


def mean_stat(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of a mean-type loss from its per-unit values (...,)."""
    total, count = _unit_sum(upcast(values), mask, 0)
    return AuxStat(total, count)


def dynmole_load_balance_stat(probs: torch.Tensor, weights: torch.Tensor,
                              mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of DynMoLE's load balance N * sum_i f_i P_i (mikecovlee/DynMoLE, _dynamic_load_balancing_loss_func):
    f_i = mean over the units of the routed weights w_i = p_i * keep_i (not a dispatch count, and with grad, as the
    reference does not detach it), P_i = mean of the softmax probabilities p_i; padding excluded by mask.
    Pooled over layers (pool_layers): the reference concatenates every layer's router logits (moe_peft/model.py,
    unpack_router_logits) and takes f and P once over layers x tokens, so losses.aux_losses sums the layers' stats."""
    probs, weights = upcast(probs), upcast(weights)
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
    weights = upcast(weights)
    c, count = _unit_sum((weights > 0).to(weights.dtype), mask, 1)
    P, _ = _unit_sum(weights, mask, 1)
    return AuxStat(P, count, c, f_over_activations=True)


def tsallis_stat(probs: torch.Tensor, q: float = 1.1, mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of DynMoLE's entropy loss: mean over the units of the normalised Tsallis entropy S_q(p + 1e-5)
    (mikecovlee/DynMoLE: entropy_loss = router_entropy.mean(), weight router_dyn_loss_coef = 0.01). The reference
    averages over every token row, padding included; here padding is excluded like every other aux loss."""
    return mean_stat(tsallis_entropy(upcast(probs), q, eps=DYNMOLE_EPS), mask)


def lambda_lower_bound(u: torch.Tensor, k: int = 2) -> torch.Tensor:
    """LD-MoLE's lower_k (eshentw/LD-MoLE loss/loss.py, lambda_interval_k): with u sorted descending,

        lower_k = 1 - (sum_{j<=k} u_(j) - k * u_(k+1))
    sparsegen_lin(u, lambda) keeps at most k experts iff lambda >= lower_k. u is detached (the bound is a target).
    With E <= k experts any lambda keeps at most k: the bound is -inf (the loss below is then 0).
    """
    u = upcast(u).detach()
    if u.shape[-1] <= k:
        return torch.full(u.shape[:-1], -math.inf, dtype=u.dtype, device=u.device)
    us = u.sort(dim=-1, descending=True).values
    return 1.0 - (us[..., :k].sum(-1) - k * us[..., k])


def lambda_sparsity_stat(u: torch.Tensor, lam: torch.Tensor, k: int = 2,
                         mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of LD-MoLE's analytical sparsity loss mean relu(lower_k(u) - lambda) over the units
    (loss/loss.py RegularizationLoss, k = 2; weight reg_loss_coef). u: the scores fed to sparsegen (..., E);
    lam: (..., 1) as the LambdaPredictor gives it."""
    lam = upcast(lam).squeeze(-1)
    return mean_stat(torch.relu(lambda_lower_bound(u, k) - lam), mask)


def lambda_mean_stat(lam: torch.Tensor, mask: Optional[torch.Tensor] = None) -> AuxStat:
    """AuxStat of LD-MoLE's mean (1 - lambda) over the units (loss/loss.py LamSparseLoss; weight lam_loss_coef):
    minimising it raises lambda, i.e. sparser routing."""
    return mean_stat(1 - upcast(lam).squeeze(-1), mask)


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
    return mean_stat(torch.logsumexp(upcast(logits), dim=-1).square(), mask)


def entropy(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean Shannon entropy -sum p log p (0 log 0 = 0) of the routing distribution; the trainer picks the sign."""
    return entropy_stat(probs, mask).finalize()


def entropy_stat(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> AuxStat:
    p = upcast(probs)
    h = -(p * p.clamp(min=torch.finfo(p.dtype).tiny).log()).sum(-1)  # finite gradient where a sparse map gives 0
    return mean_stat(h, mask)
