"""Routing functions (routing_fns.py), auxiliary losses (aux_stats.py) and router modules (router.py), read as the spec."""
import math
from types import SimpleNamespace

import entmax
import pytest
import torch

import aux_stats
import routing_fns
import router as R
from router import RouterConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


def t(*v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def ctx_for(mask, task_ids=None):
    """The few ForwardContext fields a router reads."""
    return SimpleNamespace(attention_mask=mask, task_ids=task_ids, shared={})


# --------------------------------------------------------------------------------------------- published vectors
def test_sparsemax_published_vector():
    # Martins & Astudillo 2016 style example: the two largest share the mass, the rest is exactly 0.
    torch.testing.assert_close(routing_fns.sparsemax(t(1, 0.8, 0.1, -0.5)), t(0.6, 0.4, 0, 0))


def test_sparsegen_lin_published_vector():
    # sparsegen_lin(z, 0.5) = sparsemax(2 z): sharper than sparsemax on the same scores.
    torch.testing.assert_close(routing_fns.sparsegen_lin(t(1, 0.8, 0.1, -0.5), 0.5), t(0.7, 0.3, 0, 0))


def test_entmax15_published_vector():
    torch.testing.assert_close(routing_fns.entmax15(t(-2, 0, 0.5)), t(0, 0.326007, 0.673993), atol=1e-6, rtol=0)


def test_switch_load_balance_published_value():
    # argmax dispatch f = [.5, .25, .25], mean probabilities P = [.4, .375, .225]: 3 * 0.35 = 1.05.
    p = torch.tensor([[.7, .2, .1], [.6, .3, .1], [.1, .8, .1], [.2, .2, .6]])
    torch.testing.assert_close(aux_stats.switch_load_balance(p), torch.tensor(1.05))


# --------------------------------------------------------------------------------------------- agreement with entmax
@pytest.mark.parametrize("shape", [(7, 3), (4, 5, 8), (2, 33)])
def test_sparsemax_agrees_with_entmax_package(shape):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2
    torch.testing.assert_close(routing_fns.sparsemax(z), entmax.sparsemax(z, dim=-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(7, 3), (4, 5, 8), (2, 33)])
def test_entmax15_agrees_with_entmax_package(shape):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2
    torch.testing.assert_close(routing_fns.entmax15(z), entmax.entmax15(z, dim=-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.1, 1.5, 2.0, 3.0])
def test_entmax_bisect_agrees_with_entmax_package(alpha):
    z = torch.randn(6, 4, 7, generator=torch.Generator().manual_seed(2)) * 2
    torch.testing.assert_close(routing_fns.entmax_bisect(z, alpha), entmax.entmax_bisect(z, alpha, dim=-1), atol=1e-5, rtol=1e-4)


def test_entmax_bisect_special_cases():
    # alpha = 1 is softmax, 2 is sparsemax, 1.5 is the exact entmax15.
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(routing_fns.entmax_bisect(z, 1.0), torch.softmax(z, -1))
    torch.testing.assert_close(routing_fns.entmax_bisect(z, 2.0), routing_fns.sparsemax(z), atol=1e-10, rtol=0)
    torch.testing.assert_close(routing_fns.entmax_bisect(z, 1.5), routing_fns.entmax15(z), atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------- gradients
def test_gradcheck_sparsemax():
    z = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(routing_fns.sparsemax, (z,))


def test_gradcheck_sparsegen_lin_in_z_and_lam():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    lam = (torch.rand(4, 1, dtype=torch.float64, generator=g) * 1.5 - 1).requires_grad_()  # in [-1, 0.5)
    assert torch.autograd.gradcheck(routing_fns.sparsegen_lin, (z, lam))


def test_gradcheck_entmax15():
    z = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    assert torch.autograd.gradcheck(routing_fns.entmax15, (z,))


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.5])
def test_gradcheck_entmax_bisect(alpha):
    z = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: routing_fns.entmax_bisect(x, alpha), (z,))


# --------------------------------------------------------------------------------------------- properties
def test_routing_functions_compute_in_fp32_for_half_inputs():
    # Documented contract: bf16/fp16 scores are upcast and the weights come back in fp32; float64 stays float64.
    z = torch.randn(3, 4).to(torch.bfloat16)
    for fn in (routing_fns.softmax, routing_fns.sparsemax, routing_fns.entmax15, lambda x: routing_fns.topk_softmax(x, 2), lambda x: routing_fns.entmax_bisect(x, 1.3),
               lambda x: routing_fns.sparsegen_lin(x, 0.2), routing_fns.dynmole_hybrid):
        assert fn(z).dtype == torch.float32
        assert fn(z.double()).dtype == torch.float64


def test_topk_softmax_keeps_k_experts_renormalised():
    z = torch.randn(10, 6, generator=torch.Generator().manual_seed(8))
    w = routing_fns.topk_softmax(z, 2)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    top = z.topk(2, dim=-1)
    torch.testing.assert_close(w.gather(-1, top.indices), torch.softmax(top.values, -1))


def test_sparsegen_lin_lambda_controls_sparsity():
    z = torch.randn(50, 6, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(routing_fns.sparsegen_lin(z, 0.0), routing_fns.sparsemax(z))  # lam = 0 is sparsemax
    nnz = [(routing_fns.sparsegen_lin(z, lam) > 0).sum().item() for lam in (-20.0, 0.0, 0.9)]
    assert nnz[0] > nnz[1] > nnz[2]  # lower lam: denser; lam -> 1: one-hot
    with pytest.raises(ValueError, match="lam must be < 1"):
        routing_fns.sparsegen_lin(z, 1.0)


def test_tsallis_entropy_normalised_to_unit_interval():
    assert routing_fns.tsallis_entropy(torch.full((4,), 0.25), eps=0).item() == pytest.approx(1.0)
    assert routing_fns.tsallis_entropy(t(1, 0, 0, 0), eps=0).item() == pytest.approx(0.0)


def test_dynmole_high_entropy_keeps_all_experts_unrenormalised():
    z = t(0.0, 0.01, -0.01)  # nearly uniform: normalised Tsallis entropy ~ 1 > 0.9
    torch.testing.assert_close(routing_fns.dynmole_hybrid(z), torch.softmax(z, -1))


def test_dynmole_low_entropy_is_top_p_with_at_least_k_and_not_renormalised():
    z = torch.log(t(0.85, 0.1, 0.04, 0.01))
    p = torch.softmax(z, -1)
    assert routing_fns.tsallis_entropy(p).item() < 0.9
    # Cumulative mass 0.85, 0.95, 0.99, 1: kept while <= top_p; min_k keeps the first min_k anyway; weights stay p.
    torch.testing.assert_close(routing_fns.dynmole_hybrid(z, top_p=0.75, min_k=2), p * t(1, 1, 0, 0))
    torch.testing.assert_close(routing_fns.dynmole_hybrid(z, top_p=0.9, min_k=1), p * t(1, 0, 0, 0))
    torch.testing.assert_close(routing_fns.dynmole_hybrid(z, top_p=0.97, min_k=1), p * t(1, 1, 0, 0))


# A case where DynMoLE's rule (cumulative mass <= top_p) and "mass before the expert < top_p" differ: sorted
# p = .6, .12, .10, .08, .06, .04 has cumulative mass .6, .72, .82: the official rule keeps 2 experts at top_p 0.75,
# the other rule 3 (it also takes the expert that crosses 0.75). Experts are permuted so the scatter back matters.
DYN_P = [0.10, 0.6, 0.04, 0.12, 0.08, 0.06]  # sorted: experts 1, 3, 0, 4, 5, 2
DYN_Q, DYN_EPS = 1.1, 1e-5


def dyn_tsallis_by_hand(p):
    """Normalised Tsallis entropy as moe_peft/common/moe_utils.py: (1 - sum (p + eps)^q) / (q - 1) over its max."""
    n = len(p)
    return ((1 - sum((x + DYN_EPS) ** DYN_Q for x in p)) / (DYN_Q - 1)) / ((1 - n ** (1 - DYN_Q)) / (DYN_Q - 1))


def test_dynmole_support_is_the_cumulative_mass_within_top_p_on_a_hand_case():
    assert dyn_tsallis_by_hand(DYN_P) == pytest.approx(0.7126, abs=1e-4)  # < 0.9: no broadcast
    z = torch.log(t(*DYN_P))
    w = routing_fns.dynmole_hybrid(z, top_p=0.75, min_k=1, threshold=0.9)
    torch.testing.assert_close(w, t(0, 0.6, 0, 0.12, 0, 0))  # 2 experts, weights not renormalised (sum 0.72)
    w = routing_fns.dynmole_hybrid(z, top_p=0.75, min_k=3, threshold=0.9)
    torch.testing.assert_close(w, t(0.10, 0.6, 0, 0.12, 0, 0))  # at least min_k = 3
    assert routing_fns.tsallis_entropy(t(*DYN_P), DYN_Q, eps=DYN_EPS).item() == pytest.approx(dyn_tsallis_by_hand(DYN_P))


def test_dynmole_threshold_of_one_or_more_never_broadcasts():
    z = t(0.0, 0.01, -0.01)  # nearly uniform, entropy ~ 1: broadcast at 0.9, never at threshold 1 (reference rule)
    assert (routing_fns.dynmole_hybrid(z, top_p=0.5, min_k=1, threshold=1.0) > 0).sum() == 1


def dyn_router(n_experts=6, **cfg):
    """A LearnedRouter whose scores are its pooled input: identity projection, zero bias, no input norm."""
    r = R.LearnedRouter(n_experts, n_experts, RouterConfig(normalize_input=False, **cfg))
    with torch.no_grad():
        r.proj.weight.copy_(torch.eye(n_experts))
    return r


def test_dynmole_router_weights_tsallis_and_load_balance_on_a_hand_case():
    # Unit 0: the hand case above (2 experts kept at top_p 0.75, min_k 1); unit 1: uniform (entropy 1 > 0.9: all).
    p0, p1 = DYN_P, [1 / 6] * 6
    z = torch.log(t(p0, p1))  # (2, 6)
    r = dyn_router(fn="dynmole", top_p=0.75, top_k=1, entropy_threshold=0.9, tsallis_q=DYN_Q)
    w, aux = r(z[:, None, :].repeat(1, 3, 1), ctx_for(torch.ones(2, 3)))  # 3 identical tokens: mean pool = z
    kept0 = [0, 0.6, 0, 0.12, 0, 0]
    torch.testing.assert_close(w, t(kept0, p1))
    # Tsallis loss: the mean over the units of the normalised entropy of p (reference: router_entropy.mean()).
    tsallis = (dyn_tsallis_by_hand(p0) + dyn_tsallis_by_hand(p1)) / 2
    assert aux["tsallis"].finalize().item() == pytest.approx(tsallis, rel=1e-5)
    # Load balance: N * sum_i f_i P_i with f = mean of the kept (unrenormalised) weights, P = mean of p.
    f = [(a + b) / 2 for a, b in zip(kept0, p1)]
    P = [(a + b) / 2 for a, b in zip(p0, p1)]
    assert aux["load_balance"].finalize().item() == pytest.approx(6 * sum(fi * Pi for fi, Pi in zip(f, P)), rel=1e-5)


def test_dynmole_load_balance_f_carries_gradient_like_the_reference():
    z = torch.log(t(DYN_P))[None].requires_grad_()
    p = torch.softmax(z, -1)
    st = aux_stats.dynmole_load_balance_stat(p, p * routing_fns.dynmole_keep(p, 0.75, 1), None)
    assert st.dispatch.requires_grad  # the reference does not detach tokens_per_expert


# --------------------------------------------------------------------------------------------- LD-MoLE
# Three units activating k_t = 2, 1, 3 experts (6 activations; expert counts 3, 2, 1), and a pad unit.
LD_W = [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]
LD_MASK = [1, 1, 1, 0]


def test_ldmole_load_balance_f_is_each_experts_share_of_all_activations():
    # eshentw/LD-MoLE LoadBalancingLoss._forward: f = (3, 2, 1) / 6, P = mean w = (1.7, 0.8, 0.5) / 3 over the real
    # units, loss = 3 * sum f P = 0.5 * 1.7 + 0.8 / 3 + 0.5 / 6 = 1.2.
    st = aux_stats.ldmole_load_balance_stat(t(*LD_W), t(*LD_MASK))
    assert st.finalize().item() == pytest.approx(1.2, abs=1e-6)
    # Switch's per-unit split (1/k_t to each chosen expert) gives f = (11/6, 5/6, 1/3) / 3: 3 * 3.95 / 9 = 1.3167.
    switch = aux_stats.load_balance_stat(t(*LD_W), t(*LD_MASK), t(*LD_W) > 0).finalize().item()
    assert switch == pytest.approx(3 * (11 / 6 * 1.7 + 5 / 6 * 0.8 + 1 / 3 * 0.5) / 9, abs=1e-6)


def test_ldmole_load_balance_stats_of_disjoint_units_add_up_to_the_loss_over_their_union():
    w, m = t(*LD_W), t(*LD_MASK)  # f's denominator (all activations) is summed too: a DDP / GradCache union is exact
    halves = aux_stats.ldmole_load_balance_stat(w[:1], m[:1]) + aux_stats.ldmole_load_balance_stat(w[1:], m[1:])
    assert halves.finalize().item() == pytest.approx(1.2, abs=1e-6)


def test_ldmole_router_uses_its_load_balance_and_fixed_lambda_sparsegen_switchs():
    x, ctx = torch.randn(2, 3, 8), ctx_for(torch.ones(2, 3))
    ld = R.LearnedRouter(8, 4, RouterConfig(fn="sparsegen", lambda_predictor=True))(x, ctx)[1]["load_balance"]
    fixed = R.LearnedRouter(8, 4, RouterConfig(fn="sparsegen", lam=0.5))(x, ctx)[1]["load_balance"]
    assert ld.f_over_activations and not fixed.f_over_activations


def test_lambda_predictor_starts_at_the_reference_init():
    # Reference init ("kaiming"): both weights Kaiming-uniform (a = sqrt 5, bound 1 / sqrt(fan_in)), both biases -2.5.
    torch.manual_seed(0)
    p = R.LambdaPredictor(8, hidden=4)
    assert torch.equal(p.net[0].bias, torch.full((4,), -2.5)) and torch.equal(p.net[2].bias, t(-2.5))
    assert p.net[0].weight.abs().max() <= 1 / math.sqrt(8) and p.net[2].weight.abs().max() <= 1 / math.sqrt(4)
    # Where W1 x < 2.5 the hidden layer is 0: lambda = log sigmoid(-2.5) + 1 - 0.01 = -1.58889 (denser than sparsemax).
    by_hand = math.log(1 / (1 + math.exp(2.5))) + 0.99
    assert by_hand == pytest.approx(-1.58889, abs=1e-5)
    lam = p(torch.randn(20, 8) * 0.1)
    torch.testing.assert_close(lam, torch.full((20, 1), by_hand), atol=1e-6, rtol=0)
    assert (p(torch.randn(20, 8) * 100) < 1).all()


def test_lambda_sparsity_loss_on_a_hand_case():
    # u sorted 2, 1, .5, -1 and k = 2: lower_2 = 1 - ((2 + 1) - 2 * .5) = -1 (reference lambda_interval_k).
    u = t([2.0, -1.0, 0.5, 1.0], [0.0, 0.0, 3.0, 0.0])  # unit 1: sorted 3, 0, 0, 0 -> lower = 1 - (3 - 0) = -2
    assert aux_stats.lambda_lower_bound(u, 2).tolist() == [-1.0, -2.0]
    lam = t([-1.5], [0.5])  # relu(-1 + 1.5) = 0.5; relu(-2 - 0.5) = 0
    assert aux_stats.lambda_sparsity_stat(u, lam, 2).finalize().item() == pytest.approx(0.25)
    assert aux_stats.lambda_mean_stat(lam).finalize().item() == pytest.approx(((1 + 1.5) + (1 - 0.5)) / 2)


def test_lambda_lower_bound_is_where_sparsegen_drops_to_k_experts():
    u = t(2.0, -1.0, 0.5, 1.0)
    lower = aux_stats.lambda_lower_bound(u, 2).item()
    assert (routing_fns.sparsegen_lin(u, lower + 1e-3) > 0).sum() == 2
    assert (routing_fns.sparsegen_lin(u, lower - 1e-3) > 0).sum() == 3
    assert aux_stats.lambda_lower_bound(t(1.0, 0.0), 2).item() == -math.inf  # E <= k: any lambda is sparse enough


def test_ldmole_router_returns_both_lambda_losses():
    torch.manual_seed(0)
    r = R.LearnedRouter(8, 4, RouterConfig(fn="sparsegen", lambda_predictor=True))
    x, ctx = torch.randn(2, 3, 8), ctx_for(torch.ones(2, 3))
    _, aux = r(x, ctx)
    h = r.features(x, ctx)
    lam = r.lam(h)
    torch.testing.assert_close(aux["lambda_sparsity"].finalize(), aux_stats.lambda_sparsity_stat(r.scores(h), lam).finalize())
    torch.testing.assert_close(aux["lambda_mean"].finalize(), (1 - lam).mean())


# --------------------------------------------------------------------------------------------- aux losses
def test_switch_load_balance_is_one_when_balanced():
    assert aux_stats.switch_load_balance(torch.eye(4)).item() == pytest.approx(1.0)


def test_switch_load_balance_excludes_padding():
    g = torch.Generator().manual_seed(10)
    p = torch.softmax(torch.randn(2, 5, 3, generator=g), -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    garbage = p.clone()
    garbage[mask == 0] = torch.tensor([1.0, 0.0, 0.0])  # what sits at pad positions must not matter
    real = p[mask.bool()]  # (7, 3): only the real tokens
    torch.testing.assert_close(aux_stats.switch_load_balance(garbage, mask), aux_stats.switch_load_balance(real))


def test_switch_load_balance_with_explicit_dispatch_splits_each_unit():
    # Two units, each dispatched to two experts (1/2 each): f = [.5, .25, .25].
    p = torch.tensor([[.5, .3, .2], [.3, .3, .4]])
    d = torch.tensor([[1, 1, 0], [1, 0, 1]])
    P = p.mean(0)
    assert aux_stats.switch_load_balance(p, dispatch=d).item() == pytest.approx(3 * (0.5 * P[0] + 0.25 * P[1] + 0.25 * P[2]))


def test_z_loss_is_mean_squared_logsumexp():
    z = t(1.0, 2.0, 3.0)[None].repeat(2, 1)
    assert aux_stats.z_loss(z).item() == pytest.approx(torch.logsumexp(z[0], 0).item() ** 2)


def test_entropy_is_shannon_and_has_finite_gradient_on_sparse_weights():
    assert aux_stats.entropy(torch.full((1, 4), 0.25)).item() == pytest.approx(math.log(4))
    z = t(1.0, 0.8, 0.1, -0.5).requires_grad_()
    aux_stats.entropy(routing_fns.sparsemax(z)[None]).backward()  # two exact zeros: 0 log 0 must not give NaN
    assert torch.isfinite(z.grad).all()


# --------------------------------------------------------------------------------------------- router modules
def test_pool_mean_excludes_padding_and_last_finds_last_real_token():
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(R.pool(x, right, "mean"), torch.tensor([[0.5], [5.5]]))
    torch.testing.assert_close(R.pool(x, right, "last"), torch.tensor([[1.0], [7.0]]))
    torch.testing.assert_close(R.pool(x, left, "last"), torch.tensor([[3.0], [7.0]]))


def test_task_router_gives_the_multi_hot_of_each_task():
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    w, aux = R.TaskRouter(table)(torch.zeros(3, 2, 4), ctx_for(torch.ones(3, 2), torch.tensor([1, 0, 1])))
    torch.testing.assert_close(w, table[[1, 0, 1]])
    assert aux == {}


def test_task_router_without_task_ids_is_a_clear_error():
    with pytest.raises(ValueError, match="task_ids"):
        R.TaskRouter(torch.eye(2))(torch.zeros(1, 2, 4), ctx_for(torch.ones(1, 2)))


@pytest.mark.parametrize("fn", routing_fns.ROUTING_FNS)
def test_learned_router_weights_per_sequence_and_per_token(fn):
    cfg = RouterConfig(fn=fn, lambda_predictor=(fn == "sparsegen"))
    torch.manual_seed(0)
    r = R.LearnedRouter(16, 3, cfg)
    x, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    w, aux = r(x, ctx_for(mask))
    assert w.shape == (2, 3) and w.dtype == torch.float32 and (w >= 0).all()
    lam = {"lambda_sparsity", "lambda_mean"} if fn == "sparsegen" else set()
    assert set(aux) == {"load_balance", "z_loss", "entropy", "tsallis"} | lam
    r.cfg = RouterConfig(fn=fn, granularity="token", lambda_predictor=(fn == "sparsegen"))
    w, _ = r(x, ctx_for(mask))
    assert w.shape == (2, 5, 3)


def test_learned_router_skips_aux_under_no_grad_in_eval_mode():
    r = R.LearnedRouter(8, 3, RouterConfig()).eval()
    with torch.no_grad():
        _, aux = r(torch.randn(2, 3, 8), ctx_for(torch.ones(2, 3)))
    assert aux == {}


def test_learned_router_gives_aux_stats_under_no_grad_in_training_mode():
    # GradCache's representation pass runs without grad and needs the step's aux statistics (train.py): they must
    # be the values a forward with grad gives.
    r = R.LearnedRouter(8, 3, RouterConfig()).train()
    x, mask = torch.randn(2, 3, 8), torch.ones(2, 3)
    with torch.no_grad():
        _, cached = r(x, ctx_for(mask))
    _, live = r(x, ctx_for(mask))
    assert set(cached) == set(live) == {"load_balance", "z_loss", "entropy", "tsallis"}
    for name in live:
        assert not cached[name].total.requires_grad
        torch.testing.assert_close(cached[name].finalize(), live[name].finalize().detach(), atol=0, rtol=0)


def test_prototype_scorer_prefers_the_nearest_prototype():
    r = R.LearnedRouter(4, 3, RouterConfig(scorer="prototype", fn="topk", top_k=1, normalize_input=False))
    with torch.no_grad():
        r.prototypes.copy_(torch.eye(3, 4))
    x = torch.tensor([[0.1, 0.0, 2.0, 0.0]])[:, None, :].repeat(1, 2, 1)  # closest to prototype 2
    w, _ = r(x, ctx_for(torch.ones(1, 2)))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0]]))


def test_task_embedding_input_makes_routing_task_dependent():
    torch.manual_seed(0)
    r = R.LearnedRouter(8, 3, RouterConfig(task_embed_dim=4))
    x = torch.randn(1, 3, 8).repeat(2, 1, 1)  # same text, two tasks
    w, _ = r(x, ctx_for(torch.ones(2, 3), torch.tensor([0, 1])))
    assert not torch.allclose(w[0], w[1])


@pytest.mark.parametrize("fn", ["softmax", "sparsemax", "dynmole"])
def test_temperature_applies_at_train_and_eval_alike(fn):
    torch.manual_seed(0)
    r = R.LearnedRouter(8, 3, RouterConfig(fn=fn, temperature=0.3, top_k=1, entropy_threshold=1.0))
    x, ctx = torch.randn(2, 3, 8) * 3, ctx_for(torch.ones(2, 3))
    r.train()
    w_train, _ = r(x, ctx)
    r.eval()
    w_eval, _ = r(x, ctx)
    torch.testing.assert_close(w_eval, w_train)  # one router function (no jitter, no dropout here)
    r.cfg = RouterConfig(fn=fn, top_k=1, entropy_threshold=1.0)  # T = 1
    assert not torch.allclose(r(x, ctx)[0], w_eval)  # the temperature is really applied


def test_jitter_applies_in_training_only():
    torch.manual_seed(0)
    r = R.LearnedRouter(8, 3, RouterConfig(jitter=0.5))
    x, ctx = torch.randn(2, 3, 8), ctx_for(torch.ones(2, 3))
    r.eval()
    w1, _ = r(x, ctx)
    assert torch.equal(w1, r(x, ctx)[0])  # eval: no noise
    r.cfg = RouterConfig()
    torch.testing.assert_close(r(x, ctx)[0], w1)
    r.cfg = RouterConfig(jitter=0.5)
    r.train()
    assert not torch.allclose(r(x, ctx)[0], w1)


def test_router_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"router\.fn"):
        RouterConfig(fn="gumbel")
    with pytest.raises(ValueError, match=r"router\.lam"):
        RouterConfig(lam=1.0)
    with pytest.raises(ValueError, match=r"router\.task_experts"):
        RouterConfig(kind="task", task_experts={"embed": ["embed"]})
    with pytest.raises(ValueError, match=r"router\.scorer: 'similarity' is now 'prototype'"):
        RouterConfig(scorer="similarity")
    with pytest.raises(ValueError, match=r"router\.granularity"):
        RouterConfig(kind="retriever", granularity="token")
    with pytest.raises(ValueError, match=r"router\.entropy_threshold: must be > 0"):
        RouterConfig(fn="dynmole", entropy_threshold=0.0)
