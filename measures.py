"""The measures analysis.py reports, each a small function of arrays or tensors: linear CKA, the task interference
ratio and its paired bootstrap, the significance tests of a comparison (paired bootstrap over queries, Almost
Stochastic Order over seeds, Bonferroni over datasets), gradient cosines per tensor group, an expert's delta
spectrum, principal angles and effective rank. Model-free except expert_delta_svd (one MoE-LoRA linear's slices)."""
from __future__ import annotations

from statistics import NormalDist
from typing import Callable, Optional, Sequence

import numpy as np
import torch

import moe_lora


def linear_cka(x, y) -> float:
    """Linear CKA, feature-space form: ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F).

    x (n, p), y (n, q): the same n examples in two representations; X_c, Y_c column-centred. In [0, 1];
    invariant to orthogonal transforms and isotropic scaling of either side (not to general linear maps).
    """
    x, y = (np.asarray(a, dtype=np.float64) for a in (x, y))
    x, y = x - x.mean(0), y - y.mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / den) if den > 0 else float("nan")


def task_interference_ratio(specialist: float, unified: float) -> Optional[float]:
    """TIR = (specialist - unified) / specialist; None when the specialist scores 0 (undefined)."""
    return (specialist - unified) / specialist if specialist else None


def paired_bootstrap(diff, n_resamples: int = 10000, seed: int = 0, chunk: int = 500) -> dict:
    """Two-level bootstrap of the mean of diff (S seeds, Q queries): seeds and queries resampled with replacement.

    -> {"mean", "ci95": [lo, hi] (percentiles of the resampled means), "p_value" (two-sided, shifted null:
    (1 + #{|m_b - m| >= |m|}) / (1 + B)), "n_resamples", "seed"}. Deterministic for a given seed.
    """
    d = np.asarray(diff, dtype=np.float64)
    d = d[None] if d.ndim == 1 else d
    S, Q = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        q_idx = rng.integers(Q, size=(b, Q))  # (b, Q) query columns of each resample
        s_idx = rng.integers(S, size=(b, S))  # (b, S) seed rows of each resample
        row_means = d[:, q_idx].mean(-1)  # (S, b): each seed's mean over the drawn queries
        means[start:start + b] = np.take_along_axis(row_means.T, s_idx, 1).mean(1)
    m = float(d.mean())
    p = (1 + int(np.sum(np.abs(means - m) >= abs(m)))) / (1 + n_resamples)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": m, "ci95": [float(lo), float(hi)], "p_value": p, "n_resamples": n_resamples, "seed": seed}


def paired_bootstrap_test(scores_a, scores_b, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Paired bootstrap test of two systems over queries (Koehn 2004, "Statistical Significance Tests for Machine
    Translation Evaluation"; Sakai 2006, "Evaluating Evaluation Metrics based on the Bootstrap", SIGIR).

    scores_a, scores_b (Q,) per-query metric of the two systems on the same queries (or (S, Q): seeds too, both
    levels resampled). d_q = a_q - b_q; B resamples of the queries with replacement give the means m_b; under the
    null the mean is 0, so the bootstrap distribution is shifted to it (Sakai's shifted null, Efron & Tibshirani
    1993 Alg. 16.1 with the unstudentised mean): p = (1 + #{|m_b - m| >= |m|}) / (1 + B), two-sided. Identical
    systems give p = 1; a constant shift c != 0 gives every m_b = m, so p = 1 / (1 + B). -> paired_bootstrap's
    dict (mean = mean of a - b, ci95, p_value, n_resamples, seed)."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_test: the two systems' scores differ in shape ({a.shape} vs {b.shape}); "
                         "a paired test needs the same queries in the same order")
    return paired_bootstrap(a - b, n_resamples, seed)


def empirical_quantile(x, t) -> np.ndarray:
    """F^-1(t) of the empirical distribution of x (..., n) at t (T,): the ceil(n t)-th smallest value (1-based,
    clipped to [1, n]), the rule of Dror et al.'s code and deepsig. -> (..., T)."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    idx = np.clip(np.ceil(n * np.asarray(t)).astype(np.int64) - 1, 0, n - 1)
    return x[..., idx]


def violation_ratio(scores_a, scores_b, dt: float = 0.005) -> np.ndarray:
    """ASO's violation ratio (Dror et al. 2019, eqs. 4-5): the share of the squared Wasserstein-2 distance between
    A's and B's score distributions where A is below B,

        eps_W2(F, G) = int_{V_X} (F^-1(t) - G^-1(t))^2 dt / int_0^1 (F^-1(t) - G^-1(t))^2 dt,
        V_X = {t in (0, 1): F^-1(t) < G^-1(t)}

    by the rectangle rule on t = dt, 2 dt, ... < 1 (both integrals on the same points, as in the paper and Dror's
    code; deepsig 1.2.8 leaves the first point out of the numerator only). 0 = A stochastically dominates B; 0.5
    when the distributions are equal (W2 = 0; deepsig's convention). scores (..., n) and (..., m) batch over the
    leading axes."""
    t = np.arange(dt, 1, dt)
    f, g = empirical_quantile(scores_a, t), empirical_quantile(scores_b, t)  # (..., T)
    sq = (f - g) ** 2 * dt
    w2 = sq.sum(-1)
    violated = np.where(f < g, sq, 0.0).sum(-1)
    return np.where(w2 > 0, violated / np.where(w2 > 0, w2, 1.0), 0.5)


def aso(scores_a, scores_b, confidence_level: float = 0.95, num_comparisons: int = 1, n_bootstrap: int = 1000,
        dt: float = 0.005, seed: int = 0) -> dict:
    """Almost Stochastic Order (del Barrio et al. 2018; Dror et al. 2019, "Deep Dominance - How to Properly Compare
    Deep Neural Models", ACL; official code github.com/rtmdrr/DeepComparison, reference package deepsig.aso).

    scores_a (n,), scores_b (m,): e.g. one score per training seed, higher = better; A is the system suspected to
    be better. The test's statistic is the upper confidence bound of the violation ratio (Dror et al., Sec. 3):

        eps_min = eps_W2(F_n, G_m) - sqrt((n + m) / (n m)) * sigma_hat * Phi^-1(alpha),   clipped to [0, 1]

    with alpha = 1 - confidence_level, Bonferroni-corrected over k = num_comparisons to alpha / k (deepsig 1.2.8
    writes confidence_level + alpha / k, which is alpha / k for k = 2 only: alpha (1 - 1/k) otherwise), and sigma_hat the bootstrap standard deviation (np.std, ddof 0) of
    sqrt(n m / (n + m)) * (eps_W2(F*_n, G*_m) - eps_W2(F_n, G_m)) over n_bootstrap resamples: n draws from A's
    and m from B's empirical distribution, independently (the paper's rule and deepsig's; Dror's script draws
    N = M = 1000 instead). eps_min < 0.5: A is almost stochastically better than B at that confidence; 0: A
    dominates. Seeded (numpy default_rng(seed)), so deterministic; a different seed moves eps_min by the Monte-Carlo
    error of sigma_hat only.

    -> {"eps_min", "violation_ratio", "sigma", "confidence_level" (after Bonferroni), "bootstrap": (n_bootstrap,)
    resampled violation ratios, "n_bootstrap", "seed"}.
    """
    a, b = np.asarray(scores_a, dtype=np.float64).ravel(), np.asarray(scores_b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("aso: both score lists must be non-empty")
    if not 0 < confidence_level < 1 or num_comparisons < 1 or n_bootstrap < 2:
        raise ValueError(f"aso: need 0 < confidence_level < 1, num_comparisons >= 1, n_bootstrap >= 2 (got "
                         f"{confidence_level}, {num_comparisons}, {n_bootstrap})")
    n, m = a.size, b.size
    eps = float(violation_ratio(a, b, dt))
    rng = np.random.default_rng(seed)
    boot = violation_ratio(a[rng.integers(n, size=(n_bootstrap, n))], b[rng.integers(m, size=(n_bootstrap, m))], dt)
    const = np.sqrt(n * m / (n + m))
    sigma = float(np.std(const * (boot - eps)))
    level = 1 - (1 - confidence_level) / num_comparisons  # Bonferroni: alpha / k
    eps_min = float(np.clip(eps - sigma / const * NormalDist().inv_cdf(1 - level), 0.0, 1.0))
    return {"eps_min": eps_min, "violation_ratio": eps, "sigma": sigma, "confidence_level": level,
            "bootstrap": boot, "n_bootstrap": n_bootstrap, "seed": seed}


def bonferroni(p_values: Sequence[float], alpha: float = 0.05) -> dict:
    """Bonferroni correction over m tests (e.g. one per dataset): each is significant at familywise level alpha
    when p <= alpha / m. -> {"alpha": alpha, "m", "threshold": alpha / m, "significant": [bool per test]}."""
    if not 0 < alpha < 1 or not len(p_values):
        raise ValueError(f"bonferroni: need 0 < alpha < 1 and at least one p-value (got {alpha}, {len(p_values)})")
    threshold = alpha / len(p_values)
    return {"alpha": alpha, "m": len(p_values), "threshold": threshold,
            "significant": [bool(p <= threshold) for p in p_values]}


def aso_both_ways(scores_a, scores_b, num_comparisons: int = 1, n_bootstrap: int = 1000, seed: int = 0,
                  confidence_level: float = 0.95) -> dict:
    """aso in both directions on the same scores (e.g. the per-seed means of two modes): eps_min of "A is better"
    and of "B is better" (the statistic is not symmetric, and a report should not pick the direction after seeing
    the means). -> {"eps_min_a_over_b", "eps_min_b_over_a", "confidence_level" (after Bonferroni over
    num_comparisons), "n_bootstrap", "seed"}."""
    ab = aso(scores_a, scores_b, confidence_level, num_comparisons, n_bootstrap, seed=seed)
    ba = aso(scores_b, scores_a, confidence_level, num_comparisons, n_bootstrap, seed=seed)
    return {"eps_min_a_over_b": ab["eps_min"], "eps_min_b_over_a": ba["eps_min"],
            "confidence_level": ab["confidence_level"], "n_bootstrap": n_bootstrap, "seed": seed}


def compare_to_specialist(spec: dict, uni: dict, n_resamples: int = 10000, seed: int = 0) -> dict:
    """spec, uni: {seed: (Q,) per-query metric, the same queries in the same order} -> TIR per seed + bootstrap."""
    spec_seeds, uni_seeds = sorted(spec), sorted(uni)
    paired = spec_seeds == uni_seeds
    spec_mean = np.mean([spec[s] for s in spec_seeds], axis=0)  # (Q,)
    ref = {s: (spec[s] if paired else spec_mean) for s in uni_seeds}
    tir = [task_interference_ratio(float(np.mean(ref[s])), float(np.mean(uni[s]))) for s in uni_seeds]
    defined = [t for t in tir if t is not None]
    diff = np.stack([ref[s] - uni[s] for s in uni_seeds])  # (S, Q)
    return {"seeds_paired": paired, "tir_per_seed": tir, "tir_mean": mean_or_none(defined), "tir_std": std_or_none(defined),
            "bootstrap": paired_bootstrap(diff, n_resamples, seed)}


def loss_gradients(params: dict, loss_fn: Callable[[], torch.Tensor]) -> dict:
    """One backward pass of loss_fn() -> {name: fp32 gradient w.r.t. params[name]} (zeros where it is unused)."""
    names = list(params)
    grads = torch.autograd.grad(loss_fn(), [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros(params[n].shape) if g is None else g.detach().float().cpu() for n, g in zip(names, grads)}


def gradient_cosine(params: dict, loss_fn_a: Callable, loss_fn_b: Callable, groups: Optional[dict] = None) -> dict:
    """cos(g_a, g_b) and the norms per group of tensors, from two separate backward passes.

    params {name: tensor requiring grad}; groups {group: [(param name, index or None)]} (index: a slice tuple
    into the tensor, e.g. one expert's rank slots), default one group per parameter.
    -> {group: {"cos": float, or None when either gradient is 0 (a tensor only one loss reaches), "norm_a", "norm_b"}}
    """
    ga, gb = loss_gradients(params, loss_fn_a), loss_gradients(params, loss_fn_b)
    groups = groups or {n: [(n, None)] for n in params}
    out = {}
    for group, members in groups.items():
        a = torch.cat([(ga[n] if i is None else ga[n][i]).reshape(-1) for n, i in members]).double()
        b = torch.cat([(gb[n] if i is None else gb[n][i]).reshape(-1) for n, i in members]).double()
        na, nb = float(a.norm()), float(b.norm())
        out[group] = {"cos": float(a @ b) / (na * nb) if na > 0 and nb > 0 else None, "norm_a": na, "norm_b": nb}
    return out


def principal_angles(a, b) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spaces of a (d, r1) and b (d, r2).

    Orthonormal bases Q1, Q2 (QR); cos(theta_k) = k-th singular value of Q1^T Q2 (Bjorck & Golub 1973).
    """
    q1, _ = np.linalg.qr(np.asarray(a, dtype=np.float64))
    q2, _ = np.linalg.qr(np.asarray(b, dtype=np.float64))
    return np.arccos(np.clip(np.linalg.svd(q1.T @ q2, compute_uv=False), -1.0, 1.0))


def expert_delta_svd(lin: moe_lora.MoELoRALinear, name: str) -> tuple:
    """s_e B_e A_e (out, in) of one expert -> (singular values (r,), left singular vectors (out, r)), float64.

    Without forming the delta: B = Q_b R_b, A^T = Q_a R_a, so s B A = Q_b (s R_b R_a^T) Q_a^T and the SVD of the
    small (r, r) core gives the spectrum; the left singular vectors are Q_b U.
    """
    sl = lin.expert_slice(name)
    scale = float(lin.slot_scale[sl][0])
    qb, rb = np.linalg.qr(lin.lora_B.detach()[:, sl].double().cpu().numpy())
    qa, ra = np.linalg.qr(lin.lora_A.detach()[sl].double().cpu().numpy().T)
    u, s, _ = np.linalg.svd(scale * rb @ ra.T)
    return s, qb @ u


def effective_rank(s) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007); 0 for a zero matrix."""
    p = np.asarray(s, dtype=np.float64)
    p = p[p > 0] / p.sum() if p.sum() > 0 else p[:0]
    return float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0


def mean_or_none(xs) -> Optional[float]:
    return float(np.mean(xs)) if len(xs) else None


def std_or_none(xs) -> Optional[float]:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else None
