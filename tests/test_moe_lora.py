"""MoE-LoRA experts on the frozen backbone (moe_lora.py), read as the spec. Tiny random models only."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import config
import data
import moe_lora as ML
import router as R
import tiny_setup
import train
import unimoer
from model import CausalLM, ForwardContext, ModelConfig
from moe_lora import ExpertSpec, MoELoRAConfig, MoELoRALinear
from router import RouterConfig

TINY = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


def tiny_model(seed: int = 0, dtype=torch.float32) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf_dict(TINY))
    for name, p in model.named_parameters():
        if p.dim() == 2:  # RMSNorm weights stay 1
            nn.init.normal_(p, std=0.2)
    return model.requires_grad_(False).to(dtype).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    return ids, mask, torch.tensor([0, 1, 0])


def randomize_experts(model, std: float = 0.1, seed: int = 2) -> None:
    """B is zero at init (output = base); give it values so that the experts matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in ML._linears(model):
            lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g) * std)


def attached(cfg: MoELoRAConfig, seed: int = 0, dtype=torch.float32) -> CausalLM:
    model = ML.attach(tiny_model(seed, dtype), cfg)
    randomize_experts(model)
    return model


def hand_lora(x, lin: MoELoRALinear, name: str, scale: float) -> torch.Tensor:
    """One expert's LoRA computed by hand from its own slices: scale * (x A_i^T) B_i^T."""
    sl = lin.expert_slice(name)
    return scale * (x @ lin.lora_A[sl].t()) @ lin.lora_B[:, sl].t()


def random_linear(experts, bias=True, rslora=False, dropout=0.0, seed=3):
    torch.manual_seed(seed)
    lin = MoELoRALinear(nn.Linear(16, 24, bias=bias), experts, rslora=rslora, dropout=dropout)
    nn.init.normal_(lin.lora_B, std=0.3)
    return lin


# --------------------------------------------------------------------------------------------- the linear
def test_output_at_init_equals_the_base_exactly():
    base = tiny_model()
    ids, mask, tasks = batch()
    want = base(ids, mask).hidden
    for router in (RouterConfig(), RouterConfig(granularity="token", fn="sparsemax"), RouterConfig(per_layer=False)):
        model = ML.attach(copy.deepcopy(base), MoELoRAConfig(router=router))
        assert torch.equal(model(ids, mask, task_ids=tasks).hidden, want)  # B = 0: not one bit changes


def test_a_is_kaiming_uniform_b_is_zero_and_both_fp32():
    lin = MoELoRALinear(nn.Linear(64, 8), [ExpertSpec("a", 4, 8), ExpertSpec("b", 12, 8)])
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt 5): sqrt(6 / ((1 + 5) * fan_in))
    assert lin.lora_A.abs().max() <= bound and lin.lora_A.abs().max() > 0.8 * bound
    assert torch.count_nonzero(lin.lora_B) == 0
    assert lin.lora_A.dtype == lin.lora_B.dtype == torch.float32


def test_one_expert_with_weight_one_equals_a_plain_lora_by_hand():
    lin = random_linear([ExpertSpec("a", 4, 8.0), ExpertSpec("b", 6, 3.0)])
    x = torch.randn(2, 5, 16)
    lin.gate = lin.gate_from_weights(torch.tensor([0.0, 1.0]))
    want = x @ lin.weight.t() + lin.bias + hand_lora(x, lin, "b", 3.0 / 6)
    torch.testing.assert_close(lin(x), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("per_token", [False, True])
def test_stacked_mix_equals_a_per_expert_loop_with_ranks_8_8_16(per_token):
    experts = [ExpertSpec("embed", 8, 16.0), ExpertSpec("rerank", 8, 4.0), ExpertSpec("shared", 16, 32.0)]
    lin = random_linear(experts)
    x = torch.randn(3, 7, 16)
    w = torch.rand(3, 7, 3) if per_token else torch.rand(3, 3)
    gate = lin.gate_from_weights(w)
    lin.gate = gate if per_token else gate[:, None, :]
    want = F.linear(x, lin.weight, lin.bias)
    for i, e in enumerate(experts):
        wi = w[..., i, None] if per_token else w[:, None, i, None]
        want = want + wi * hand_lora(x, lin, e.name, e.alpha / e.r)
    torch.testing.assert_close(lin(x), want, atol=1e-6, rtol=1e-6)


def test_rslora_scales_by_alpha_over_sqrt_r():
    lin = random_linear([ExpertSpec("a", 16, 8.0)], rslora=True)
    x = torch.randn(2, 3, 16)
    lin.gate = lin.gate_from_weights(torch.ones(1))
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias) + hand_lora(x, lin, "a", 8.0 / 4),
                               atol=1e-6, rtol=1e-6)


def test_dropout_acts_on_the_adapter_input_in_training_only():
    lin = random_linear([ExpertSpec("a", 4, 8.0)], dropout=0.5)
    x = torch.randn(4, 5, 16)
    lin.gate = lin.gate_from_weights(torch.ones(1))
    lin.eval()
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias) + hand_lora(x, lin, "a", 2.0),
                               atol=1e-6, rtol=1e-6)
    lin.train()
    assert not torch.allclose(lin(x), lin(x))  # a new dropout mask each call
    with torch.no_grad():
        lin.lora_B.zero_()
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # the base path never sees dropout


def test_bf16_base_keeps_fp32_adapters_and_returns_bf16():
    model = attached(MoELoRAConfig(), dtype=torch.bfloat16)
    ids, mask, tasks = batch()
    assert model(ids, mask, task_ids=tasks).hidden.dtype == torch.bfloat16
    for p in ML.adapter_parameters(model):
        assert p.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_forward_without_a_gate_is_a_clear_error():
    lin = MoELoRALinear(nn.Linear(4, 4), [ExpertSpec("a", 2, 2)])
    with pytest.raises(RuntimeError, match="no routing gate"):
        lin(torch.randn(1, 2, 4))


# --------------------------------------------------------------------------------------------- attach / train
def test_attach_wraps_only_the_chosen_projections_of_the_chosen_layers():
    base_keys = set(tiny_model().state_dict())
    model = ML.attach(tiny_model(), MoELoRAConfig(targets=["q", "v", "down_proj"], layers=[0, 2]))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)}
    assert wrapped == {f"model.layers.{i}.{p}" for i in (0, 2)
                       for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert model.model.layers[1].adapter_hook is None
    assert base_keys <= set(model.state_dict())  # HF parameter names unchanged: q_proj.weight, not q_proj.base.weight


def test_only_experts_and_routers_train_and_a_step_leaves_the_base_unchanged():
    model = attached(MoELoRAConfig(router=RouterConfig(task_embed_dim=4)))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "adapter_hook" not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_A" in n or "lora_B" in n or ".adapter_hook.router." in n) for n in trainable)
    assert {id(p) for p in ML.adapter_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids, mask, tasks = batch()
    model.train()
    out = model(ids, mask, task_ids=tasks)
    (out.hidden.square().mean() + sum(out.aux.values())).backward()
    opt.step()
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    assert all(p.grad is not None for p in ML.adapter_parameters(model))


def test_attaching_twice_or_to_missing_layers_is_a_clear_error():
    model = ML.attach(tiny_model(), MoELoRAConfig())
    with pytest.raises(ValueError, match="already carries"):
        ML.attach(model, MoELoRAConfig())
    with pytest.raises(ValueError, match=r"moe_lora\.layers"):
        ML.attach(tiny_model(), MoELoRAConfig(layers=[0, 3]))


def test_detach_restores_the_plain_backbone():
    base = tiny_model()
    ids, mask, tasks = batch()
    model = attached(MoELoRAConfig())
    ML.merge(model, "embed")
    ML.detach(model)  # unmerges first (exact up to fp32 rounding)
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(model(ids, mask).hidden, base(ids, mask).hidden, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- routing
def captured(model, task_ids=None, **kw):
    ids, mask, tasks = batch()
    return model(ids, mask, task_ids=tasks if task_ids is None else task_ids, capture_routing=True, **kw)


def hard(shared="always", task_experts=None):
    return MoELoRAConfig(shared=shared, router=RouterConfig(
        kind="task", task_experts=task_experts or {"embed": ["embed"], "rerank": ["rerank"]}))


def test_hard_routing_gives_each_task_exactly_its_experts():
    model = attached(hard())  # experts embed, rerank, shared (always on)
    out = captured(model)
    for _, w in out.routing:  # task ids [0, 1, 0]
        assert torch.equal(w, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))
    # The other task's expert has no effect at all: zeroing its B leaves that sequence unchanged.
    for task, other in ((0, "rerank"), (1, "embed")):
        ablated = copy.deepcopy(model)
        with torch.no_grad():
            for lin in ML._linears(ablated):
                lin.lora_B[:, lin.expert_slice(other)] = 0
        rows = (torch.tensor([0, 1, 0]) == task)
        assert torch.equal(captured(ablated).hidden[rows], out.hidden[rows])


def test_hard_switch_without_shared_is_one_hot():
    model = attached(hard(shared=None))
    for _, w in captured(model).routing:
        assert torch.equal(w, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_shared_expert_always_on_or_routed_as_configured():
    always = attached(MoELoRAConfig(shared="always"))
    routed = attached(MoELoRAConfig(shared="routed"))
    assert always.model.layers[0].adapter_hook.router.proj.out_features == 2  # embed, rerank
    assert routed.model.layers[0].adapter_hook.router.proj.out_features == 3  # embed, rerank, shared
    for _, w in captured(always).routing:
        assert torch.equal(w[:, 2], torch.ones(3))  # the shared column is the constant 1, outside the router
        torch.testing.assert_close(w[:, :2].sum(-1), torch.ones(3))
    for _, w in captured(routed).routing:
        torch.testing.assert_close(w.sum(-1), torch.ones(3))  # softmax over all three


def test_a_single_always_on_expert_is_a_plain_lora_with_no_router():
    model = attached(MoELoRAConfig(experts=[ExpertSpec("lora", 8, 16.0)], shared="always", shared_expert="lora"))
    assert all(b.adapter_hook.router is None for b in model.model.layers)
    ids, mask, _ = batch()
    model(ids, mask)  # no task ids needed
    lin = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 3, 32)
    model.model.layers[0].adapter_hook(x, ForwardContext(mask))  # the gate the block gets (held for one call)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight) + hand_lora(x, lin, "lora", 2.0), atol=1e-6, rtol=1e-6)


def gates_left(model) -> list:
    return [m.gate for m in model.modules() if isinstance(m, MoELoRALinear) and m.gate is not None]


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_no_module_holds_routing_state_after_a_forward_or_its_backward(grad_checkpointing):
    """The gate a block's MoE linears read is set at block entry and taken back when the block is done (issue 12:
    it used to stay behind, referencing the router graph, until a caller remembered clear_routing)."""
    model = attached(MoELoRAConfig())  # learned routers on every layer
    model.train()
    model.gradient_checkpointing = grad_checkpointing
    ids, mask, tasks = batch()
    seen = []  # the gates are there while the block runs
    model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, args: seen.append(m.gate is not None))
    out = model(ids, mask, task_ids=tasks)
    assert seen == [True] and gates_left(model) == []
    out.hidden.sum().backward()  # under checkpointing the recompute sets and takes back the gates again
    assert gates_left(model) == [] and seen == [True] * (2 if grad_checkpointing else 1)


def test_a_failing_block_leaves_no_routing_state():
    model = attached(MoELoRAConfig())
    ids, mask, tasks = batch()

    def fail(module, args):
        raise RuntimeError("boom")

    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(ids, mask, task_ids=tasks)
    assert gates_left(model) == []

def test_token_level_routing_gives_per_token_weights():
    out = captured(attached(MoELoRAConfig(router=RouterConfig(granularity="token"))))
    assert [w.shape for _, w in out.routing] == [(3, 6, 3)] * 3


def test_once_per_sequence_router_serves_all_layers():
    model = attached(MoELoRAConfig(router=RouterConfig(per_layer=False)))
    assert [b.adapter_hook.router is not None for b in model.model.layers] == [True, False, False]
    out = captured(model, output_hidden_states=True)
    assert all(torch.equal(w, out.routing[0][1]) for _, w in out.routing)
    # Its aux losses are added once per forward: the model's value is that of the single router call.
    ids, mask, tasks = batch()
    ctx = type("Ctx", (), dict(attention_mask=mask, task_ids=tasks, shared={}))()
    _, aux = model.model.layers[0].adapter_hook.router(out.layer_hidden[0], ctx)
    for name, value in out.aux.items():
        torch.testing.assert_close(value, aux[name].finalize())


def test_padding_does_not_change_a_sequences_output():
    model = attached(MoELoRAConfig(router=RouterConfig(pooling="mean")))
    ids, mask, tasks = batch()
    alone = model(ids[1:2, :4], mask[1:2, :4], task_ids=tasks[1:2]).hidden
    torch.testing.assert_close(model(ids, mask, task_ids=tasks).hidden[1:2, :4], alone, atol=1e-5, rtol=1e-5)


def test_capture_records_each_layer_and_is_off_by_default():
    model = attached(MoELoRAConfig(layers=[0, 2]))
    out = captured(model)
    assert [layer for layer, _ in out.routing] == [0, 2]
    assert all(w.shape == (3, 3) and not w.requires_grad for _, w in out.routing)
    ids, mask, tasks = batch()
    assert model(ids, mask, task_ids=tasks).routing is None


# --------------------------------------------------------------------------------------------- aux losses
def test_aux_losses_are_returned_by_the_call_as_the_mean_over_layers():
    model = attached(MoELoRAConfig())
    ids, mask, tasks = batch()
    out = model(ids, mask, task_ids=tasks, output_hidden_states=True)
    assert set(out.aux) == {"load_balance", "z_loss", "entropy", "tsallis"}  # lambda_*: lambda predictor only
    ctx = type("Ctx", (), dict(attention_mask=mask, task_ids=tasks, shared={}))()
    per_layer = [blk.adapter_hook.router(out.layer_hidden[i], ctx)[1] for i, blk in enumerate(model.model.layers)]
    for name, value in out.aux.items():
        torch.testing.assert_close(value, torch.stack([a[name].finalize() for a in per_layer]).mean())
    assert not hasattr(model, "aux") and not hasattr(R, "aux")  # nothing kept in global or module state


def test_a_dynmole_calls_load_balance_is_pooled_over_layers_as_its_reference():
    # mikecovlee/DynMoLE: N * sum_i mean(w_i) mean(p_i) over the concatenated rows of every layer's router.
    model = attached(MoELoRAConfig(shared="routed", router=RouterConfig(fn="dynmole", granularity="token")))
    ids, mask, tasks = batch()
    out = model(ids, mask, task_ids=tasks, output_hidden_states=True)
    ctx = type("Ctx", (), dict(attention_mask=mask, task_ids=tasks, shared={}))()
    ws, ps = [], []
    for i, blk in enumerate(model.model.layers):
        r = blk.adapter_hook.router
        w, _ = r(out.layer_hidden[i], ctx)
        ws.append(w[mask.bool()])
        ps.append(torch.softmax(r.scores(r.features(out.layer_hidden[i], ctx)), -1)[mask.bool()])
    rows_w, rows_p = torch.cat(ws), torch.cat(ps)  # (layers * real tokens, E)
    torch.testing.assert_close(out.aux["load_balance"], 3 * (rows_w.mean(0) * rows_p.mean(0)).sum())


def test_gradient_checkpointing_neither_double_counts_aux_nor_breaks_backward():
    for router in (RouterConfig(), RouterConfig(per_layer=False, granularity="token", fn="entmax15")):
        model = attached(MoELoRAConfig(router=router))
        model.train()
        ids, mask, tasks = batch()
        grads, auxes = [], []
        for ckpt in (False, True):
            model.gradient_checkpointing = ckpt
            out = model(ids, mask, task_ids=tasks)
            (out.hidden.square().mean() + sum(out.aux.values())).backward()
            grads.append([p.grad.clone() for p in ML.adapter_parameters(model)])
            auxes.append({k: v.detach() for k, v in out.aux.items()})
            for p in ML.adapter_parameters(model):
                p.grad = None
        assert auxes[0] == auxes[1]  # same values: the recompute in backward added nothing
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------- save / load
def full_router_cfg():
    return MoELoRAConfig(experts=[ExpertSpec("embed", 4, 8.0), ExpertSpec("rerank", 4, 8.0),
                                  ExpertSpec("shared", 8, 4.0)], rslora=True, shared="routed", targets=["q", "down"],
                         router=RouterConfig(fn="sparsegen", lambda_predictor=True, task_embed_dim=3,
                                             granularity="token"))


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = attached(full_router_cfg())
    with torch.no_grad():
        for p in ML.adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)  # routers too, not only the experts' B
    path = str(tmp_path / "adapters.safetensors")
    ML.save_adapters(model, path)
    fresh = tiny_model()  # same base, no experts: the file's spec rebuilds them
    cfg = ML.load_adapters(fresh, path)
    assert cfg == model.moe_lora_config
    ids, mask, tasks = batch()
    assert torch.equal(fresh(ids, mask, task_ids=tasks).hidden, model(ids, mask, task_ids=tasks).hidden)


def test_saved_file_holds_only_adapter_tensors_and_the_spec(tmp_path):
    model = attached(full_router_cfg())
    path = str(tmp_path / "a.safetensors")
    ML.save_adapters(model, path)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        spec = json.loads(f.metadata()[ML.METADATA_KEY])
    assert keys == set(ML.adapter_state_dict(model))
    assert all("lora_" in k or ".adapter_hook." in k for k in keys)
    assert MoELoRAConfig.from_dict(spec) == model.moe_lora_config


def test_load_with_a_missing_key_names_the_file(tmp_path):
    model = attached(MoELoRAConfig())
    path = str(tmp_path / "broken.safetensors")
    sd = {k: v.detach().contiguous() for k, v in ML.adapter_state_dict(model).items()}
    sd.pop(next(iter(sd)))
    save_file(sd, path, metadata={ML.METADATA_KEY: json.dumps(model.moe_lora_config.to_dict())})
    with pytest.raises(ValueError, match=r"broken\.safetensors.*missing"):
        ML.load_adapters(tiny_model(), path)


def test_load_into_a_model_with_other_experts_or_a_plain_file_is_a_clear_error(tmp_path):
    model = attached(MoELoRAConfig())
    path = str(tmp_path / "a.safetensors")
    ML.save_adapters(model, path)
    with pytest.raises(ValueError, match="different spec"):
        ML.load_adapters(attached(MoELoRAConfig(rslora=True)), path)
    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match=r"plain\.safetensors.*not a MoE-LoRA"):
        ML.load_adapters(tiny_model(), plain)


# --------------------------------------------------------------------------------------------- merge
def test_merge_then_unmerge_restores_the_weights():
    model = attached(hard())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ML.merge(model, "rerank")
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])
    ML.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)


def test_merged_model_equals_the_hard_routed_model():
    model = attached(hard())
    ids, mask, _ = batch()
    for t, task in enumerate(["embed", "rerank"]):
        routed = model(ids, mask, task_ids=torch.full((3,), t)).hidden
        ML.merge(model, task)
        merged = model(ids, mask).hidden  # no routing (and no task ids) needed once merged
        ML.unmerge(model)
        torch.testing.assert_close(merged, routed, atol=1e-5, rtol=1e-5)


def test_merge_with_explicit_weights_and_unknown_names():
    model = attached(MoELoRAConfig())
    w = ML.fixed_weights(model.moe_lora_config, {"embed": 0.25, "rerank": 0.75})
    assert w.tolist() == [0.25, 0.75, 1.0]  # the always-on shared expert gets 1
    with pytest.raises(ValueError, match="not routed experts"):
        ML.merge(model, {"shared": 1.0})


def test_fixed_routing_equals_the_task_routed_model_without_task_ids():
    # A learned router: inside fixed_routing it is not called, every token gets the task's one-hot gate (+ the
    # always-on shared expert), as the task router gives that task's rows.
    ids, mask, _ = batch()
    learned, routed = attached(MoELoRAConfig()), attached(hard())  # same base
    with torch.no_grad():  # and the same experts (the learned routers' init draws from the RNG in between)
        for a, b in zip(ML._linears(learned), ML._linears(routed)):
            a.lora_A.copy_(b.lora_A), a.lora_B.copy_(b.lora_B)
    for t, task in enumerate(["embed", "rerank"]):
        with ML.fixed_routing(learned, task):
            fixed = learned(ids, mask, capture_routing=True)
        ref = routed(ids, mask, task_ids=torch.full((3,), t)).hidden
        torch.testing.assert_close(fixed.hidden, ref, atol=1e-6, rtol=1e-6)
        assert fixed.aux == {}  # no router ran
        assert all(torch.equal(w, ML.fixed_weights(learned.moe_lora_config, task).expand(3, -1))
                   for _, w in fixed.routing)


def test_fixed_routing_is_undone_on_exit_and_refused_on_a_merged_model():
    model = attached(MoELoRAConfig())
    ids, mask, _ = batch()
    before = model(ids, mask).hidden
    with pytest.raises(KeyError):
        with ML.fixed_routing(model, "embed"):
            assert all(b.adapter_hook.routing_is_fixed for b in model.model.layers)
            raise KeyError("inside")  # an error in the block restores the routing too
    assert not any(b.adapter_hook.routing_is_fixed for b in model.model.layers)
    assert torch.equal(model(ids, mask).hidden, before)
    ML.merge(model, "embed")
    with pytest.raises(RuntimeError, match="merged model: unmerge first"):
        with ML.fixed_routing(model, "rerank"):
            pass


# --------------------------------------------------------------------------------------------- config
def test_config_round_trips_through_a_plain_dict():
    cfg = full_router_cfg()
    d = json.loads(json.dumps(cfg.to_dict()))  # what YAML / safetensors metadata hold
    assert MoELoRAConfig.from_dict(d) == cfg
    assert MoELoRAConfig(targets=["q", "gate"]).targets == ["q_proj", "gate_proj"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(experts=[{"name": "a", "r": 0, "alpha": 1.0}], shared=None), r"moe_lora\.experts"),
    (dict(targets=["qkv"]), r"moe_lora\.targets"),
    (dict(shared="sometimes"), r"moe_lora\.shared"),
    (dict(dropout=1.5), r"moe_lora\.dropout"),
    (dict(router={"fn": "nope"}), r"router\.fn"),
    (dict(router={"kind": "task", "task_experts": {"embed": ["shared"], "rerank": ["rerank"]}}),
     r"router\.task_experts"),
    (dict(shared="routed", router={"kind": "retriever"}), r"router\.task_experts: kind 'retriever'.*\['shared'\]"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoELoRAConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key.*'rank'"):
        MoELoRAConfig.from_dict({"rank": 8})
    with pytest.raises(ValueError, match=r"router: unknown key"):
        MoELoRAConfig.from_dict({"router": {"topk": 2}})
    with pytest.raises(ValueError, match=r"moe_lora\.experts\[0\]: unknown key"):
        MoELoRAConfig.from_dict({"experts": [{"name": "a", "rank": 8}]})


# --------------------------------------------------------------------------------------------- LD-MoLE lambda sharing
def ldmole_cfg(**router):
    return MoELoRAConfig(router=RouterConfig(fn="sparsegen", lambda_predictor=True, **router))


def test_one_lambda_predictor_serves_all_layers_by_default_and_is_saved_once():
    model = attached(ldmole_cfg())
    routers = [b.adapter_hook.router for b in model.model.layers]
    assert all(r.lambda_predictor is routers[0].lam for r in routers)  # LD-MoLE's GlobalSparsegen
    lam_keys = [k for k in ML.adapter_state_dict(model) if ".lam." in k]
    assert lam_keys == ["model.layers.0.adapter_hook.router.lam.net.0.weight",
                        "model.layers.0.adapter_hook.router.lam.net.0.bias",
                        "model.layers.0.adapter_hook.router.lam.net.2.weight",
                        "model.layers.0.adapter_hook.router.lam.net.2.bias"]
    params = ML.adapter_parameters(model)
    assert len({id(p) for p in params}) == len(params)  # no parameter listed twice for the optimizer
    model.train()
    ids, mask, tasks = batch()
    out = model(ids, mask, task_ids=tasks)
    (out.hidden.square().mean() + out.aux["lambda_sparsity"]).backward()
    assert routers[0].lam.net[0].weight.grad is not None  # gradients from every layer reach the one predictor


def test_per_layer_lambda_predictors_as_an_option():
    model = attached(ldmole_cfg(lambda_shared=False))
    lams = [b.adapter_hook.router.lambda_predictor for b in model.model.layers]
    assert len({id(m) for m in lams}) == 3 and all(b.adapter_hook.router.lam is not None for b in model.model.layers)


def test_shared_lambda_predictor_round_trips_through_save_and_load(tmp_path):
    model = attached(ldmole_cfg())
    with torch.no_grad():
        for p in ML.adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / "adapters.safetensors")
    ML.save_adapters(model, path)
    fresh = tiny_model()
    ML.load_adapters(fresh, path)
    ids, mask, tasks = batch()
    assert torch.equal(fresh(ids, mask, task_ids=tasks).hidden, model(ids, mask, task_ids=tasks).hidden)


# --------------------------------------------------------------------------------------------- RouterRetriever
def retriever_cfg(score="dot"):
    return MoELoRAConfig(shared="routed", router=RouterConfig(
        kind="retriever", retriever_score=score, task_experts={"embed": ["embed", "shared"], "rerank": ["rerank"]}))


def plain_embedding(ids, mask):
    """The frozen base's embedding computed without any experts: mean of the final-norm states over real tokens."""
    h = tiny_model()(ids, mask).hidden
    m = mask.float()[:, :, None]
    return (h * m).sum(1) / m.sum(1)


def three_groups():
    """Inputs of three 'experts' drawn from disjoint id ranges, so that their base embeddings differ."""
    g = torch.Generator().manual_seed(5)
    groups = [torch.randint(lo, lo + 20, (4, 6), generator=g) for lo in (0, 21, 42)]
    return groups, torch.ones(4, 6, dtype=torch.long)


def test_experts_off_gives_the_plain_base_exactly():
    model = attached(MoELoRAConfig())  # B randomised: the experts do change the output when on
    ids, mask, tasks = batch()
    assert not torch.equal(model(ids, mask, task_ids=tasks).hidden, tiny_model()(ids, mask).hidden)
    assert torch.equal(model(ids, mask, adapters=False).hidden, tiny_model()(ids, mask).hidden)


@pytest.mark.parametrize("score", ["dot", "cos"])
def test_retriever_routes_to_the_expert_whose_pilot_mean_is_nearest(score):
    model = attached(retriever_cfg(score))
    groups, mask = three_groups()
    names = model.moe_lora_config.routed_experts  # embed, rerank, shared
    pilots = ML.set_pilot_embeddings(model, {n: [(g, mask, True)] for n, g in zip(names, groups)})
    by_hand = torch.stack([plain_embedding(g, mask).mean(0) for g in groups])  # centroid of each expert's inputs
    torch.testing.assert_close(pilots, by_hand)
    ids, qmask = torch.cat([g[:2] for g in groups]), torch.ones(6, 6, dtype=torch.long)  # held-in + mixed inputs
    ids[1] = torch.randint(0, 63, (6,), generator=torch.Generator().manual_seed(9))
    e = plain_embedding(ids, qmask)
    s = F.normalize(e, dim=-1) @ F.normalize(by_hand, dim=-1).t() if score == "cos" else e @ by_hand.t()
    expected = F.one_hot(s.argmax(-1), 3).float()
    assert len(set(s.argmax(-1).tolist())) > 1  # the case is not trivial: several experts are chosen
    out = model(ids, qmask, capture_routing=True)
    for _, w in out.routing:  # one decision for all layers, top-1
        torch.testing.assert_close(w, expected)


def test_retriever_router_trains_nothing():
    model = attached(retriever_cfg())
    groups, mask = three_groups()
    ML.set_pilot_embeddings(model, {n: [(g, mask, True)] for n, g in zip(model.moe_lora_config.routed_experts, groups)})
    router = model.model.layers[0].adapter_hook.router
    assert isinstance(router, R.RetrieverRouter) and list(router.parameters()) == []
    assert {id(p) for p in ML.adapter_parameters(model)} == {id(p) for lin in ML._linears(model)
                                                             for p in (lin.lora_A, lin.lora_B)}
    model.train()
    ids, mask, tasks = batch()
    out = model(ids, mask, task_ids=tasks, capture_routing=True)
    assert out.aux == {} and not out.routing[0][1].requires_grad
    before = router.pilots.clone()
    out.hidden.square().mean().backward()
    assert torch.equal(router.pilots, before) and router.pilots.grad is None


def test_retriever_pilots_round_trip_through_save_and_load(tmp_path):
    model = attached(retriever_cfg())
    groups, mask = three_groups()
    ML.set_pilot_embeddings(model, {n: [(g, mask, True)] for n, g in zip(model.moe_lora_config.routed_experts, groups)})
    path = str(tmp_path / "adapters.safetensors")
    ML.save_adapters(model, path)
    with safe_open(path, framework="pt") as f:
        assert "model.layers.0.adapter_hook.router.pilots" in set(f.keys())
    fresh = tiny_model()
    ML.load_adapters(fresh, path)
    ids, mask, _ = batch()
    a, b = fresh(ids, mask, capture_routing=True), model(ids, mask, capture_routing=True)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.routing[0][1], b.routing[0][1])


def test_a_retriever_run_stores_the_centroids_of_its_tasks_inputs_as_pilots(tmp_path):
    task = tiny_setup.write_synthetic(str(tmp_path / "synthetic"))
    router = {"kind": "retriever", "pilot_examples": 6,
              "task_experts": {"embed": ["embed", "shared"], "rerank": ["rerank", "shared"]}}
    cfg = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), router=router,
                                  adapters={"shared": "routed"}, train={"steps": 1, "save_every": 1, "eval_every": 1})
    train.main([cfg])
    um = unimoer.load_run(str(tmp_path / "run"))  # the pilots come back from the checkpoint's adapters.safetensors

    def plain_mean_embeddings(b):  # the base with the experts off, mean-pooled over real tokens
        h = um.base(b["input_ids"], b["attention_mask"], adapters=False).hidden
        m = b["attention_mask"].float()[:, :, None]
        return (h * m).sum(1) / m.sum(1)

    ex = data.read_train_jsonl(os.path.join(task, "train.jsonl"))[:6]
    q, pos, neg = [e["query"] for e in ex], [e["pos"][0] for e in ex], [e["neg"][0] for e in ex]
    with torch.no_grad():
        embed = torch.cat([plain_mean_embeddings(um.tokens_queries(q)),
                           plain_mean_embeddings(um.tokens_documents(pos))])
        rerank = plain_mean_embeddings(um.tokens_pairs(q + q, pos + neg))
    # rows: embed, rerank, and the shared expert that both tasks list (the centroid of all the inputs)
    expected = torch.stack([embed.mean(0), rerank.mean(0), torch.cat([embed, rerank]).mean(0)])
    torch.testing.assert_close(ML._retriever(um.base).pilots, expected)
    # 2 inputs per example for each task: that centroid is the midpoint of the other two pilots, so its dot product
    # is the mean of theirs and never the largest (why the Experiment-2 configs keep the shared expert always on)
    torch.testing.assert_close(expected[2], (expected[0] + expected[1]) / 2)


def test_retriever_without_pilots_is_a_clear_error():
    model = attached(retriever_cfg())
    ids, mask, _ = batch()
    with pytest.raises(RuntimeError, match="no pilot embeddings"):
        model(ids, mask)


# --------------------------------------------------------------------------------------------- Experiment 2 configs
EXP2 = ["topk", "sparsemax", "entmax15", "dynmole", "ldmole", "retriever"]


def exp2_model(name: str, overrides=()):
    """configs/tiny_exp2_<name>.yaml's experts and router on the tiny test base; learned routers get the same
    projection (seeded, large enough that routing is confident), the retriever pilots from three input groups."""
    spec = config.adapter_config(config.load_config(f"configs/tiny_exp2_{name}.yaml", overrides))
    model = ML.attach(tiny_model(), spec)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for blk in model.model.layers:
            r = blk.adapter_hook.router
            if isinstance(r, R.LearnedRouter):
                r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g) * 0.5)
                r.proj.bias.zero_()
    if spec.router.kind == "retriever":
        groups, mask = three_groups()
        ML.set_pilot_embeddings(model, {n: [(gr, mask, True)] for n, gr in zip(spec.routed_experts, groups)})
    return model


@pytest.mark.parametrize("name", EXP2)
def test_each_experiment2_router_config_routes_differently_from_softmax(name):
    ids, mask, tasks = batch()
    ids = torch.cat([ids, three_groups()[0][2][:3]])  # a few inputs the retriever sends to other experts
    mask, tasks = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)]), torch.cat([tasks, tasks])
    cfg = config.load_config(f"configs/tiny_exp2_{name}.yaml")
    # softmax with the same routed experts (the retriever's shared expert is always on) and granularity
    like = [f"--adapters.shared={cfg.adapters.shared}", f"--router.granularity={cfg.router.granularity}"]
    ref = exp2_model("softmax", like)(ids, mask, task_ids=tasks, capture_routing=True).routing
    got = exp2_model(name)(ids, mask, task_ids=tasks, capture_routing=True).routing
    # every expert's weight, config order (embed, rerank, shared; an always-on shared expert at 1), per token or not
    assert got[0][1].shape == ref[0][1].shape == ((6, 6, 3) if cfg.router.granularity == "token" else (6, 3))
    assert not torch.allclose(got[0][1], ref[0][1], atol=1e-3)
    assert ((got[0][1] == 0) & (ref[0][1] > 0)).any()  # sparse: an expert softmax weighs gets exactly 0
