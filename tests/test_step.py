"""One optimizer step of train.py as a spec: which units the router aux losses are taken over (train.aux_scope),
GradCache (train.grad_accum > 1 equals one step on the whole batch), and experts a step does not train staying
bit-identical, AdamW moments included.

Aux-scope values are hand-computed; GradCache is checked against one forward/backward on the whole batch (and,
with dropout and router jitter, against the same chunks kept in one autograd graph); the held experts against
the previous checkpoint. DDP versions (global aux scope, GradCache under 2-rank gloo) are in test_ddp.py.
"""
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import config
import losses
import moe_lora
import aux_stats
import router
import tiny_setup
import train
import unimoer


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("step") / "synthetic"))


# --------------------------------------------------------------------------------------------- aux scope
def lb_call(n_units: int, p_expert0: float) -> dict:
    """One base call's load-balance statistics: n_units sequences, each routed (argmax) with probabilities
    (p, 1 - p) over two experts."""
    probs = torch.tensor([[p_expert0, 1 - p_expert0]]).expand(n_units, 2)
    return {"load_balance": [aux_stats.load_balance_stat(probs)]}


def task_split_calls(b: int = 1, g: int = 4) -> list:
    """Perfectly task-split routing with p = 0.9: b queries and b * g documents to expert 0, b * g pairs to
    expert 1 (the issue's case: n_neg = 3, so g = 4)."""
    return [lb_call(b, 0.9), lb_call(b * g, 0.9), lb_call(b * g, 0.1)]


def test_load_balance_of_task_split_routing_over_the_steps_union_is_about_1_01():
    # Over the union of the 9 sequences: f = (5, 4) / 9 (5 go to expert 0), P = (5 * .9 + 4 * .1, 5 * .1 + 4 * .9)
    # / 9 = (4.9, 4.1) / 9, so N sum_i f_i P_i = 2 (5 * 4.9 + 4 * 4.1) / 81 = 1.00988: both experts are used.
    by_hand = 2 * (5 * 4.9 + 4 * 4.1) / 81
    got = losses.aux_losses(task_split_calls(), "step")["load_balance"]
    assert got.item() == pytest.approx(by_hand, abs=1e-6)
    assert got.item() == pytest.approx(1.01, abs=0.001)


def test_the_per_call_scope_reproduces_1_80_on_task_split_routing():
    # Each call alone sends everything to one expert: f = (1, 0), P = (.9, .1) (or mirrored): 2 * .9 = 1.8 each.
    got = losses.aux_losses(task_split_calls(), "call")["load_balance"]
    assert got.item() == pytest.approx(1.80, abs=1e-6)


def test_the_global_scope_on_one_process_equals_the_step_scope():
    calls = task_split_calls(b=2)
    assert losses.aux_losses(calls, "global")["load_balance"].item() == \
        losses.aux_losses(calls, "step")["load_balance"].item()


def test_mean_type_aux_losses_over_the_step_weigh_every_unit_once():
    # z_loss / entropy are means over units: one call with 1 unit of value 1 and one with 3 units of value 3 give
    # (1 + 3 * 3) / 4 = 2.5 over the step, but (1 + 3) / 2 = 2 as a mean of per-call means.
    calls = [{"z_loss": [aux_stats.mean_stat(torch.tensor([1.0]))]},
             {"z_loss": [aux_stats.mean_stat(torch.tensor([3.0, 3.0, 3.0]))]}]
    assert losses.aux_losses(calls, "step")["z_loss"].item() == pytest.approx(2.5)
    assert losses.aux_losses(calls, "call")["z_loss"].item() == pytest.approx(2.0)


def test_aux_losses_are_the_mean_over_layers_of_each_layers_loss_over_the_union():
    # Layer 0 is task-split (1.00988 over the union), layer 1 routes everything to expert 0 with p = .9 (1.8).
    split, same = task_split_calls(), [lb_call(1, 0.9), lb_call(4, 0.9), lb_call(4, 0.9)]
    calls = [{"load_balance": a["load_balance"] + b["load_balance"]} for a, b in zip(split, same)]
    got = losses.aux_losses(calls, "step")["load_balance"]
    assert got.item() == pytest.approx((2 * (5 * 4.9 + 4 * 4.1) / 81 + 1.8) / 2, abs=1e-6)


def test_dynmole_load_balance_is_one_loss_pooled_over_layers_and_units():
    # mikecovlee/DynMoLE concatenates all layers' router logits (unpack_router_logits) and takes f = mean kept weight
    # and P = mean softmax once over layers x tokens. Layer 0 keeps expert 0 of p = (.8, .2), layer 1 expert 1 of
    # p = (.2, .8): pooled f = (.4, .4), P = (.5, .5), 2 * (.4 * .5 + .4 * .5) = 0.8; the mean of the per-layer
    # losses would be 2 * .8 * .8 = 1.28.
    p = [torch.tensor([[0.8, 0.2]]), torch.tensor([[0.2, 0.8]])]
    w = [torch.tensor([[0.8, 0.0]]), torch.tensor([[0.0, 0.8]])]
    calls = [{"load_balance": [aux_stats.dynmole_load_balance_stat(pi, wi) for pi, wi in zip(p, w)]}]
    rows_p, rows_w = torch.cat(p), torch.cat(w)  # the reference's (layers * tokens, E)
    by_hand = 2 * (rows_w.mean(0) * rows_p.mean(0)).sum().item()
    assert by_hand == pytest.approx(0.8)
    for scope in ("call", "step", "global"):
        assert losses.aux_losses(calls, scope)["load_balance"].item() == pytest.approx(0.8, abs=1e-6)


def test_the_step_scope_gradient_flows_into_every_calls_probabilities():
    # d/dP_sum_i of N sum_i f_i P_sum_i / n^2 = N f_i / n^2 for every unit of every call: (2 * 5/9 / 9, 2 * 4/9 / 9).
    probs = [torch.tensor([[0.9, 0.1]] * n, requires_grad=True) for n in (1, 4)] + \
        [torch.tensor([[0.1, 0.9]] * 4, requires_grad=True)]
    calls = [{"load_balance": [aux_stats.load_balance_stat(p)]} for p in probs]
    losses.aux_losses(calls, "step")["load_balance"].backward()
    for p in probs:
        torch.testing.assert_close(p.grad, torch.tensor([[2 * 5 / 81, 2 * 4 / 81]]).expand_as(p))


# --------------------------------------------------------------------------------------------- GradCache
def build(tmp_path, task, **sections):
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), **sections)
    cfg = train.prepare(config.load_config(cfg_path), 0)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)  # B = 0 would zero A's gradient and the adapters' effect
    return cfg, um


def batch(um, task, n_queries: int, chunks: int) -> list:
    return tiny_setup.step_chunks(um, task, 0, n_queries, chunks)


def grads(um) -> dict:
    out = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
           for n, p in um.named_parameters() if p.requires_grad}
    um.zero_grad(set_to_none=True)
    return out


# Every loss on: InfoNCE, the rerank loss, and the aux losses with non-zero weights.
AUX_ON = {"load_balance": 0.5, "z_loss": 0.1, "entropy": 0.1}
# DynMoLE over three routed experts: a sparse top-p support, and a load balance whose f (the mean kept weight)
# carries gradient, which GradCache must pass back through its cached dispatch sums too.
DYNMOLE = {"router": {"fn": "dynmole", "top_k": 1, "top_p": 0.5}, "adapters": {"shared": "routed"}}


@pytest.mark.parametrize("rerank_loss,router", [("bce", {}), ("group", {}), ("bce", DYNMOLE)],
                         ids=["bce", "group", "dynmole"])
def test_gradcache_loss_and_gradients_equal_one_step_on_the_whole_batch(task, tmp_path, rerank_loss, router):
    cfg, um = build(tmp_path, task, train={"aux_weights": {**AUX_ON, "tsallis": 0.1}, "rerank_loss": rerank_loss,
                                           "aux_scope": "step"}, **router)
    group = 1 + cfg.data.n_neg
    um.train()
    finite, whole_log = train.forward_backward(um, um, batch(um, task, 4, 1), cfg, group)
    whole = grads(um)
    finite_gc, gc_log = train.forward_backward(um, um, batch(um, task, 4, 2), cfg, group)  # GradCache: 2 chunks
    gc = grads(um)

    assert finite and finite_gc
    assert whole_log.keys() == gc_log.keys() == {"emb", "rank", "load_balance", "z_loss", "entropy", "tsallis"}
    for k in whole_log:
        assert gc_log[k] == pytest.approx(whole_log[k], abs=1e-5), k
    assert any(float(g.abs().max()) > 1e-3 for g in whole.values())  # not a comparison of zeros
    for name, g in whole.items():
        # (chunks pad to other lengths than the whole batch, which moves fp32 rounding by ~1e-6)
        torch.testing.assert_close(gc[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_grad_accum_infonce_sees_every_chunks_documents_as_negatives(task, tmp_path):
    # The bug GradCache fixes: a per-micro-batch InfoNCE (the mean of the chunks' own losses) has fewer
    # negatives, so it is lower than the step's.
    cfg, um = build(tmp_path, task)
    um.train()
    chunks = batch(um, task, 4, 2)
    with torch.no_grad():
        per_chunk = [losses.info_nce_loss(o["q"], o["d"], cfg.train.temperature, False).item()
                     for o in (um(**c) for c in chunks)]
    _, log = train.forward_backward(um, um, chunks, cfg, 1 + cfg.data.n_neg)
    assert log["emb"] > sum(per_chunk) / 2 + 1e-3


def test_gradcache_replays_the_rng_so_dropout_and_jitter_match_the_representation_pass(task, tmp_path):
    # With adapter dropout and router jitter, the reference is the same chunks forwarded with grad in the same
    # order from the same RNG state, kept in one autograd graph: what GradCache must equal. A re-forward that
    # drew fresh masks would differ by far more than the tolerance.
    cfg, um = build(tmp_path, task, adapters={"dropout": 0.3}, router={"jitter": 0.2},
                    train={"aux_weights": AUX_ON, "aux_scope": "step"})
    group = 1 + cfg.data.n_neg
    chunks = batch(um, task, 4, 2)
    um.train()
    torch.manual_seed(123)
    loss, ref_log = train.step_loss([um(**c) for c in chunks], cfg, group)
    loss.backward()
    ref, ref_rng = grads(um), torch.get_rng_state()
    torch.manual_seed(123)
    _, gc_log = train.gradcache_backward(um, um, chunks, cfg, group)
    gc = grads(um)
    assert gc_log == pytest.approx(ref_log, abs=1e-6)
    for name, g in ref.items():
        torch.testing.assert_close(gc[name], g, atol=1e-6, rtol=1e-6, msg=name)
    assert torch.equal(torch.get_rng_state(), ref_rng)  # the stream continues as after one pass


def test_a_grad_accum_run_ends_with_the_adapters_of_a_one_chunk_run(task, tmp_path):
    # grad_accum 2 splits each step's batch into two GradCache chunks of the same examples (the sampler's
    # micro-batches 2s and 2s+1 are the grad_accum-1 batch s), so the runs agree up to fp32 rounding (amplified by
    # Adam where a gradient is ~eps; see test_ddp.py's run comparison for the same tolerance).
    sections = dict(train={"steps": 3, "eval_every": 3, "save_every": 3, "aux_weights": AUX_ON})
    runs = {}
    for ga in (1, 2):
        out = str(tmp_path / f"ga{ga}")
        cfg_path = tiny_setup.write_config(str(tmp_path / f"ga{ga}.yaml"), task, out, **sections)
        train.main([cfg_path, f"--train.grad_accum={ga}"])
        runs[ga] = run_adapters(out)
    for name in runs[1]:
        diff = (runs[1][name] - runs[2][name]).abs()
        assert float(diff.max()) < 1e-4, name
        assert float((diff > 1e-6).float().mean()) < 0.01, name


def run_adapters(out_dir) -> dict:
    return load_file(os.path.join(unimoer.checkpoint_dir(out_dir), "adapters.safetensors"))


# --------------------------------------------------------------------------------------------- held experts
def slices_with_moments(ckpt: str, expert: str) -> dict:
    """{tensor name: (parameter slice, exp_avg slice, exp_avg_sq slice)} of one expert's rows of every lora_A and
    columns of every lora_B, from a checkpoint (the optimizer's state is indexed in trainable_parameters order)."""
    um = unimoer.load_run(ckpt)
    names = [n for n, p in moe_lora.adapter_state_dict(um.base).items() if isinstance(p, nn.Parameter)]
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=True)["optimizer"]
    params = dict(moe_lora.adapter_state_dict(um.base))
    linears = {n: m for n, m in um.base.named_modules() if isinstance(m, moe_lora.MoELoRALinear)}
    out = {}
    for i, name in enumerate(names):
        lin, kind = name.rsplit(".", 1)
        if kind not in ("lora_A", "lora_B"):
            continue
        sl = linears[lin].expert_slice(expert)
        idx = (sl, slice(None)) if kind == "lora_A" else (slice(None), sl)
        st = state["state"][i]
        out[name] = (params[name].detach()[idx].clone(), st["exp_avg"][idx], st["exp_avg_sq"][idx])
    return out


def assert_held(before: dict, after: dict, held: bool, what: str) -> None:
    for name in before:
        same = [torch.equal(x, y) for x, y in zip(before[name], after[name])]
        assert same == [held] * 3, (what, name, same)  # parameter, exp_avg, exp_avg_sq


def test_an_alternate_step_leaves_the_other_tasks_expert_and_its_moments_bit_identical(task, tmp_path):
    # hard_switch, one task per step: embed, rerank, embed, rerank. Step 4 trains rerank only: the embed expert
    # (trained at steps 1 and 3, so its moments are non-zero) must keep A, B, exp_avg and exp_avg_sq exactly,
    # weight decay included; the rerank expert moves.
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), train={
        "mode": "hard_switch", "schedule": "alternate", "steps": 4, "save_every": 1, "eval_every": 4,
        "weight_decay": 0.1})
    train.main([cfg_path])
    c3, c4 = (os.path.join(tmp_path, "run", f"checkpoint-00000{i}") for i in (3, 4))
    before, after = slices_with_moments(c3, "embed"), slices_with_moments(c4, "embed")
    assert any(float(m.abs().max()) > 0 for _, m, _ in before.values())  # moments a decay would change
    assert_held(before, after, True, "embed at a rerank step")
    assert_held(slices_with_moments(c3, "rerank"), slices_with_moments(c4, "rerank"), False, "rerank trains")


def test_a_frozen_expert_keeps_its_moments_under_a_learned_router(task, tmp_path):
    # joint_moe: stage 1 trains every expert for 2 steps, stage 2 freezes embed. The learned router reaches embed,
    # so its gradient is not zero: freezing must hold the parameter and AdamW's moments at step 3.
    stages = [{"steps": 2}, {"steps": 1, "freeze_experts": ["embed"]}]
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), train={
        "mode": "joint_moe", "stages": stages, "save_every": 1, "eval_every": 3, "weight_decay": 0.1})
    train.main([cfg_path])
    c2, c3 = (os.path.join(tmp_path, "run", f"checkpoint-00000{i}") for i in (2, 3))
    before = slices_with_moments(c2, "embed")
    assert any(float(m.abs().max()) > 0 for _, m, _ in before.values())
    assert_held(before, slices_with_moments(c3, "embed"), True, "frozen embed")
    assert_held(slices_with_moments(c2, "shared"), slices_with_moments(c3, "shared"), False, "shared trains")


@pytest.mark.parametrize("mode,tasks,untrained", [
    ("hard_switch", ["rerank"], ["embed"]), ("hard_switch", ["embed"], ["rerank"]),
    ("hard_switch_shared", ["embed"], ["rerank"]), ("hard_switch", ["embed", "rerank"], []),
    ("joint_moe", ["rerank"], []), ("no_shared", ["embed"], [])])
def test_untrained_experts_follow_from_which_experts_the_steps_tasks_can_reach(task, tmp_path, mode, tasks,
                                                                               untrained):
    _, um = build(tmp_path, task, train={"mode": mode})
    assert train.untrained_experts(um, tasks, []) == untrained
    assert train.untrained_experts(um, tasks, ["embed"]) == sorted(set(untrained) | {"embed"},
                                                                   key=["embed", "rerank", "shared"].index)


def test_freezing_an_unknown_expert_is_one_config_error_naming_it(task, tmp_path):
    _, um = build(tmp_path, task, train={"mode": "hard_switch"})
    with pytest.raises(config.ConfigError, match="freeze_experts: no expert 'shared'"):
        train.untrained_experts(um, ["embed"], ["shared"])


def test_a_gradcache_run_with_dropout_resumes_exactly(task, tmp_path, monkeypatch):
    # GradCache draws dropout and jitter in its representation pass and replays them in a forked RNG, so the RNG a
    # checkpoint saves is where pass 1 left it: a run stopped after step 2's checkpoint and resumed ends
    # bit-identical to the uninterrupted one.
    sections = dict(adapters={"dropout": 0.2}, router={"jitter": 0.1},
                    train={"steps": 4, "save_every": 2, "eval_every": 4, "grad_accum": 2})
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, whole, **sections)
    train.main([cfg_path])
    cut_cfg = tiny_setup.write_config(str(tmp_path / "cut.yaml"), task, cut, **sections)
    forward_backward, calls = train.forward_backward, []

    def stop_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during step 3, after checkpoint 2
        return forward_backward(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(train, "forward_backward", stop_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train.main([cut_cfg])
    train.main([cut_cfg, "--resume"])
    a, b = run_adapters(whole), run_adapters(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
