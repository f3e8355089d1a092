"""mtl.py (train.mtl): PCGrad against Alg. 1 of Yu et al. 2020 on hand-computed two-task cases, GradNorm's and
FAMO's weight updates against one hand-computed step of their equations, which slices count as shared, tiny training
steps with each method, the config rules, and an exact resume of GradNorm / FAMO runs.
"""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import config
import mtl
import tiny_setup
import train
import unimoer
from config import ConfigError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("mtl") / "synthetic"))


def no_shuffle(x):
    """A fixed order (with two tasks there is one j, so the order never matters)."""


# --------------------------------------------------------------------------------------------- PCGrad
def test_pcgrad_projects_each_conflicting_gradient_off_the_original_other():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1 . g2 = -1 < 0: g1' = g1 - (-1 / ||g2||^2 = 2) g2 = [1, 0] + 0.5 [-1, 1] = [0.5, 0.5]
    #                   g2' = g2 - (-1 / ||g1||^2 = 1) g1 = [-1, 1] + [1, 0] = [0, 1]
    # (against the projected g1' = [0.5, 0.5] instead, g2 . g1' = 0 and g2 would stay [-1, 1])
    p1, p2 = mtl.pcgrad([g1, g2], no_shuffle)
    assert torch.allclose(p1, torch.tensor([0.5, 0.5]))
    assert torch.allclose(p2, torch.tensor([0.0, 1.0]))
    assert torch.equal(g1, torch.tensor([1.0, 0.0])) and torch.equal(g2, torch.tensor([-1.0, 1.0]))  # inputs kept


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # g1 . g2 = 1 >= 0: no projection
    p1, p2 = mtl.pcgrad([g1, g2], no_shuffle)
    assert torch.equal(p1 + p2, torch.tensor([2.0, 1.0]))


def test_pcgrad_backward_projects_the_shared_elements_only_and_adds_the_aux_gradient_after():
    shared, own = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    # Linear losses, so the gradients are the coefficients: task 1 reaches both tensors, task 2 only `shared`.
    l1 = torch.tensor([1.0, 0.0]) @ shared + torch.tensor([1.0, 1.0]) @ own
    l2 = torch.tensor([-1.0, 1.0]) @ shared
    aux = torch.tensor([0.25, 0.0]) @ shared + torch.tensor([0.0, 0.5]) @ own
    masks = [torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)]
    mtl.PCGrad().backward({"emb": l1, "rank": l2}, [aux], [shared, own], masks)
    # shared: [0.5, 0.5] + [0, 1] (the first test's projections) + aux [0.25, 0]. own: task 1's [1, 1], unprojected
    # (projecting the whole vector [1, 0, 1, 1] against [-1, 1, 0, 0] would give task 2 a share of it), + aux [0, 0.5].
    assert torch.allclose(shared.grad, torch.tensor([0.75, 1.5]))
    assert torch.allclose(own.grad, torch.tensor([1.0, 1.5]))


def build(task, tmp_path, **train_over):
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), train=train_over)
    return unimoer.build_model(train.prepare(config.load_config(cfg_path), 0), torch.device("cpu"))


def test_shared_masks_follow_which_experts_both_tasks_reach(task, tmp_path):
    um = build(task, tmp_path, mode="hard_switch_shared")
    params = unimoer.trainable_parameters(um)
    held = train.frozen_slices(um, ["rerank"])
    masks = {id(p): m for p, m in zip(params, mtl.shared_masks(um, params, ["embed", "rerank"], held))}
    lin = next(m for m in um.base.modules() if isinstance(m, unimoer.moe_lora.MoELoRALinear))
    a, b = masks[id(lin.lora_A)], masks[id(lin.lora_B)]
    # Hard switch: embed and rerank each reach their own expert; the always-on shared expert both.
    assert a[lin.expert_slice("shared")].all() and b[:, lin.expert_slice("shared")].all()
    assert not a[lin.expert_slice("embed")].any() and not b[:, lin.expert_slice("embed")].any()
    assert not a[lin.expert_slice("rerank")].any()

    um = build(task, tmp_path / "moe", mode="joint_moe")  # a learned router: every expert both tasks reach
    params = unimoer.trainable_parameters(um)
    masks = mtl.shared_masks(um, params, ["embed", "rerank"], train.frozen_slices(um, ["embed"]))
    lin = next(m for m in um.base.modules() if isinstance(m, unimoer.moe_lora.MoELoRALinear))
    a = masks[next(i for i, p in enumerate(params) if p is lin.lora_A)]
    assert a[lin.expert_slice("rerank")].all() and a[lin.expert_slice("shared")].all()
    assert not a[lin.expert_slice("embed")].any()  # frozen: not trained, so not shared


# --------------------------------------------------------------------------------------------- GradNorm
def test_gradnorm_weight_update_is_one_step_of_eq_1_2_then_renormalised():
    gn = mtl.GradNorm(3, alpha=1.5, lr=0.1, cfg=None, device="cpu")
    gn.initial = torch.tensor([2.0, 1.0, 1.0])  # L_i(0)
    gn.update(torch.tensor([1.0, 1.0, 2.0]), norms=torch.tensor([1.0, 2.0, 3.0]))
    # Ltilde = [0.5, 1, 2], mean 7/6 -> r = [3/7, 6/7, 12/7]; r^1.5 = [0.28057, 0.79356, 2.24453]
    # G = w * ||grad_W L|| = [1, 2, 3], Gbar = 2 -> targets 2 r^1.5 = [0.56113, 1.58712, 4.48905]
    # G - target = [+0.43887, +0.41288, -1.48905] -> d L_grad / d w_i = sign(.) * ||grad_W L_i|| = [1, 2, -3]
    r = [3 / 7, 6 / 7, 12 / 7]
    target = [2 * x ** 1.5 for x in r]
    expected_grad = [math.copysign(n, g - t) for g, t, n in zip([1, 2, 3], target, [1, 2, 3])]
    assert expected_grad == [1, 2, -3]
    assert torch.allclose(gn.w.grad, torch.tensor([1.0, 2.0, -3.0]))
    # Adam's first step moves each w_i by lr * g / |g| (bias-corrected m / sqrt(v)): [0.9, 0.9, 1.1], sum 2.9;
    # renormalised to sum 3: * 3 / 2.9
    assert torch.allclose(gn.w.detach(), torch.tensor([0.9, 0.9, 1.1]) * 3 / 2.9, atol=1e-6)
    assert abs(float(gn.w.detach().sum()) - 3) < 1e-6


def test_gradnorm_first_update_takes_its_losses_as_l0():
    gn = mtl.GradNorm(2, alpha=1.5, lr=0.1, cfg=None, device="cpu")
    gn.update(torch.tensor([3.0, 1.0]), norms=torch.tensor([2.0, 1.0]))
    # L(0) = L(t): r = [1, 1], targets = Gbar = 1.5; G - target = [0.5, -0.5] -> grad [2, -1]
    assert torch.equal(gn.initial, torch.tensor([3.0, 1.0]))
    assert torch.allclose(gn.w.grad, torch.tensor([2.0, -1.0]))
    assert torch.allclose(gn.w.detach(), torch.tensor([0.9, 1.1]), atol=1e-6)


# --------------------------------------------------------------------------------------------- FAMO
def test_famo_logit_update_is_one_step_of_its_equations():
    famo = mtl.FAMO(2, lr=0.025, gamma=1.0, delta="same_batch", cfg=None, device="cpu")
    with torch.no_grad():
        famo.xi.copy_(torch.tensor([0.2, 0.0]))
    famo.prev = torch.tensor([2.0, 1.0])  # L(theta_t)
    famo.update(torch.tensor([1.6, 0.5]))  # L(theta_{t+1})
    # z = softmax([0.2, 0]) = [0.54983, 0.45017]; delta = log L_t - log L_t+1 = [log 1.25, log 2] = [0.22314, 0.69315]
    # J_softmax^T delta = z_i (delta_i - z . delta) = [-0.11634, +0.11634]; + gamma xi = [0.2, 0] -> [0.08366, 0.11634]
    z0 = math.exp(0.2) / (math.exp(0.2) + 1)
    z = [z0, 1 - z0]
    delta = [math.log(2 / 1.6), math.log(1 / 0.5)]
    zd = z[0] * delta[0] + z[1] * delta[1]
    jtd = [z[i] * (delta[i] - zd) for i in range(2)]
    assert torch.allclose(famo.xi.grad, torch.tensor(jtd), atol=1e-6)
    # Adam's first step: xi -= lr * sign(J^T delta + gamma xi) = [0.2 - 0.025, 0 - 0.025]; without gamma the first
    # logit would rise (its loss fell less, so its weight grows): the decay term is visible here
    assert jtd[0] + 1.0 * 0.2 > 0 and jtd[0] < 0
    assert torch.allclose(famo.xi.detach(), torch.tensor([0.175, -0.025]), atol=1e-6)


def test_famo_weights_give_the_gradient_of_the_official_log_loss():
    theta = torch.tensor([0.3, -1.2], requires_grad=True)
    xi = torch.tensor([0.4, -0.1])
    losses = torch.stack([(theta ** 2).sum() + 0.5, ((theta - 1) ** 2).sum()])
    # The official get_weighted_loss: sum_i z_i log D_i / c, c = sum_i z_i / D_i detached, D_i = L_i - 0 + 1e-8
    z = F.softmax(xi, -1)
    d = losses + 1e-8
    official = torch.autograd.grad((d.log() * z / (z / d).sum().detach()).sum(), theta, retain_graph=True)[0]
    famo = mtl.FAMO(2, lr=0.025, gamma=0.01, delta="same_batch", cfg=None, device="cpu")
    with torch.no_grad():
        famo.xi.copy_(xi)
    a = famo.weights(losses.detach())
    ours = torch.autograd.grad((a * losses).sum(), theta)[0]
    assert torch.allclose(ours, official, atol=1e-6)
    assert abs(float(a.sum()) - 1) < 1e-6


# --------------------------------------------------------------------------------------------- training
def run_dir_tensors(out_dir) -> dict:
    return load_file(os.path.join(unimoer.checkpoint_dir(out_dir), "adapters.safetensors"))


def train_state(out_dir) -> dict:
    return torch.load(os.path.join(unimoer.checkpoint_dir(out_dir), "trainer_state.pt"), weights_only=True)


@pytest.mark.parametrize("over", [{"mtl": "pcgrad"}, {"mtl": "gradnorm"}, {"mtl": "famo"},
                                  {"mtl": "famo", "famo_delta": "next_step"}, {"mtl": "famo", "grad_accum": 2},
                                  {"mtl": "pcgrad", "mode": "hard_switch_shared"}],
                         ids=["pcgrad", "gradnorm", "famo", "famo_next_step", "famo_gradcache", "pcgrad_hard_shared"])
def test_a_training_step_with_each_method_runs_and_changes_the_parameters(task, tmp_path, over):
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"),
                                       train={"steps": 3, "eval_every": 3, "save_every": 3, "warmup_steps": 1, **over})
    train.main([cfg_path])
    start = unimoer.build_model(config.load_config(str(tmp_path / "run" / "config.yaml")), torch.device("cpu"))
    init = {k: v.detach() for k, v in unimoer.moe_lora.adapter_state_dict(start.base).items()}
    final = run_dir_tensors(str(tmp_path / "run"))
    assert any(not torch.equal(final[k], init[k]) for k in final if k.endswith("lora_B"))
    logs = [line for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert len(logs) == 3 and all('"skipped": false' in x for x in logs)
    key = {"pcgrad": "pc_cos", "gradnorm": "w_emb", "famo": "z_emb"}[over["mtl"]]
    assert all(f'"{key}"' in x for x in logs)
    if over["mtl"] != "pcgrad":  # the learned task weights moved from their start (1, 1) / (0.5, 0.5)
        w = [json.loads(x)[key] for x in logs]
        assert len(set(w)) > 1


@pytest.mark.parametrize("over", [{"mtl": "gradnorm"}, {"mtl": "famo"}, {"mtl": "famo", "famo_delta": "next_step"}],
                         ids=["gradnorm", "famo", "famo_next_step"])
def test_a_resumed_run_ends_identical_to_an_uninterrupted_one(task, tmp_path, over):
    # Dropout draws from torch's RNG (also FAMO's extra forward); the task weights, their Adam state, GradNorm's
    # L_i(0) and FAMO's previous losses must all come back from checkpoint 2 for step 3 and 4 to match.
    run = {"train": {"steps": 4, "eval_every": 2, "save_every": 2, "warmup_steps": 1, **over},
           "adapters": {"dropout": 0.1}}
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "full"), **run)
    train.main([cfg_path])
    full = str(tmp_path / "full")
    part = str(tmp_path / "part")
    shutil.copytree(full, part)
    shutil.rmtree(os.path.join(part, "checkpoint-000004"))
    for pointer in ("latest", "last_good"):  # as a kill right after checkpoint 2 leaves it
        with open(os.path.join(part, pointer), "w") as f:
            f.write("checkpoint-000002\n")
    state2 = torch.load(os.path.join(part, "checkpoint-000002", "trainer_state.pt"), weights_only=True)["mtl"]
    train.main([cfg_path, f"--train.out_dir={part}", "--resume"])
    a, b = run_dir_tensors(full), run_dir_tensors(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = train_state(full)["mtl"], train_state(part)["mtl"]
    weights = "w" if over["mtl"] == "gradnorm" else "xi"
    assert torch.equal(sa[weights], sb[weights]) and not torch.equal(sa[weights], state2[weights])
    assert open(os.path.join(full, "train_log.jsonl")).read() == open(os.path.join(part, "train_log.jsonl")).read()


@pytest.mark.parametrize("over, match", [
    ({"mtl": "pcgrad", "mode": "emb_only"}, r"train.mtl 'pcgrad' balances two task losses; train.mode 'emb_only'"),
    ({"mtl": "famo", "schedule": "alternate"}, r"train.schedule 'alternate' gives each step one task"),
    ({"mtl": "gradnorm", "grad_accum": 2, "batch_size": 4}, r"train.mtl 'gradnorm' with train.grad_accum 2"),
    ({"mtl": "pcgrad", "mode": "hard_switch"}, r"train.mode 'hard_switch' has none"),
    ({"mtl": "famo", "rank_weight": 2.0}, r"train.emb_weight/rank_weight must stay 1.0"),
    ({"mtl": "gradnorm", "gradnorm_lr": 0.0}, r"train.gradnorm_lr"),
], ids=["one_task_mode", "alternate", "gradcache", "hard_switch", "static_weights", "lr"])
def test_a_combination_that_cannot_work_is_one_config_error_naming_the_keys(task, tmp_path, over, match):
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), train=over)
    with pytest.raises(ConfigError, match=match):
        config.load_config(cfg_path)


def test_a_one_task_stage_under_a_method_is_the_plain_step(task, tmp_path):
    # A stage that trains reranking only: PCGrad has nothing to project there and the step is the plain one, the
    # same update (and RNG draws) as a run without train.mtl from the same start.
    over = {"steps": 1, "warmup_steps": 1, "eval_every": 1, "save_every": 1,
            "stages": [{"steps": 1, "tasks": "rerank"}]}
    outs = []
    for name, extra in (("plain", {}), ("pc", {"mtl": "pcgrad"})):
        cfg_path = tiny_setup.write_config(str(tmp_path / f"{name}.yaml"), task, str(tmp_path / name),
                                           train={**over, **extra})
        train.main([cfg_path])
        outs.append(run_dir_tensors(str(tmp_path / name)))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
