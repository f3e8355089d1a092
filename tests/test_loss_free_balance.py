"""Auxiliary-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3 inference/model.py Gate):
the sign update on hand-computed counts, the bias changing the selection but not the weights (against a reference
written out here), zero bias = the plain router bit for bit, counting each unit once (GradCache, eval, no grad),
save/load, the config errors, and a skewed toy router driven toward balance.
"""
import json
import os

import pytest
import torch
from safetensors import safe_open

import config
import moe_lora
import router
import routing_fns
import tiny_setup
import train
import unimoer
from model import ConfigError, ForwardContext


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("lfb") / "synthetic"))


def learned(n_experts=3, hidden=8, seed=0, **cfg) -> router.LearnedRouter:
    torch.manual_seed(seed)
    return router.LearnedRouter(hidden, n_experts, router.RouterConfig(**cfg))


def seq_ctx(batch: int) -> ForwardContext:
    return ForwardContext(torch.ones(batch, 5, dtype=torch.long))


# --------------------------------------------------------------------------------------------- the update rule
def test_bias_update_is_u_times_the_sign_of_mean_load_minus_load_with_ties_left_alone():
    # counts (5, 1, 3): mean 3, e = (-2, +2, 0) -> sign (-1, +1, 0); u = 0.01 on b = (0.1, 0, -0.2)
    b = router.loss_free_bias_update(torch.tensor([0.1, 0.0, -0.2]), torch.tensor([5.0, 1.0, 3.0]), 0.01)
    torch.testing.assert_close(b, torch.tensor([0.09, 0.01, -0.2]))
    # perfectly balanced: every e_i = 0, nothing moves
    b0 = torch.tensor([0.3, -0.1])
    assert torch.equal(router.loss_free_bias_update(b0, torch.tensor([4.0, 4.0]), 0.5), b0)


def test_max_violation_is_max_load_over_mean_load_minus_one():
    # (6, 2, 1): mean 3, (6 - 3) / 3 = 1; no units at all: 0
    torch.testing.assert_close(router.max_violation(torch.tensor([6.0, 2.0, 1.0])), torch.tensor(1.0))
    assert float(router.max_violation(torch.zeros(3))) == 0.0


# --------------------------------------------------------------------------------------------- selection vs weights
def reference_biased_topk(z: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 3 written out row by row: S = the k largest softmax(z)_i + b_i; w_i = exp(z_i) / sum_{j in S} exp(z_j)
    on S (top-k softmax of the UNbiased scores over the biased selection), 0 elsewhere. float64."""
    z = z.double()
    out = torch.zeros_like(z)
    for r in range(z.shape[0]):
        s = [float(v) for v in torch.exp(z[r]) / torch.exp(z[r]).sum()]
        order = sorted(range(len(s)), key=lambda i: -(s[i] + float(bias[i])))
        sel = order[:k]
        denom = sum(float(torch.exp(z[r, j])) for j in sel)
        for i in sel:
            out[r, i] = float(torch.exp(z[r, i])) / denom
    return out


def test_the_bias_changes_the_selected_experts_but_not_the_weights_of_the_selected():
    rt = learned(fn="topk", top_k=2, loss_free_balance=True)
    x = torch.randn(64, 5, 8)
    with torch.no_grad():
        rt.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.4]))  # pushes expert 2 into the selection
        z = rt.scores(rt.features(x, seq_ctx(64)))
        w_plain = routing_fns.topk_softmax(z, 2)
    rt.eval()
    with torch.no_grad():
        w, _ = rt(x, seq_ctx(64))
    torch.testing.assert_close(w.double(), reference_biased_topk(z, rt.balance_bias, 2), atol=1e-6, rtol=1e-6)
    changed = ((w > 0) != (w_plain > 0)).any(-1)
    assert changed.any() and not changed.all()  # the bias moved some rows' selection, not every row's
    # rows whose selection is unchanged get exactly the plain weights (the bias never enters the values)
    assert torch.equal(w[~changed], w_plain[~changed])


def test_dynmole_bias_reorders_the_top_p_admission_and_keeps_the_unbiased_mass():
    # p = (0.5, 0.3, 0.2), top_p 0.75, at least 1, entropy test off (threshold >= 1).
    # plain: cumsum (0.5, 0.8, 1.0) -> keep {0}. bias (0, 0.25, 0): order by p + b = (0.5, 0.55, 0.2) -> 1, 0, 2;
    # cumulative unbiased mass in that order (0.3, 0.8, 1.0) -> keep {1}; its weight stays p_1 = 0.3.
    z = torch.tensor([0.5, 0.3, 0.2]).log()
    w_plain = routing_fns.dynmole_hybrid(z, top_p=0.75, min_k=1, threshold=1.0)
    w = routing_fns.dynmole_hybrid(z, top_p=0.75, min_k=1, threshold=1.0, bias=torch.tensor([0.0, 0.25, 0.0]))
    torch.testing.assert_close(w_plain, torch.tensor([0.5, 0.0, 0.0]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.3, 0.0]))


@pytest.mark.parametrize("fn,granularity", [("topk", "sequence"), ("topk", "token"), ("dynmole", "token")])
def test_with_zero_bias_the_router_equals_the_plain_router_bit_for_bit(fn, granularity):
    kw = dict(fn=fn, top_k=1 if fn == "dynmole" else 2, top_p=0.5, granularity=granularity)
    plain, lfb = learned(seed=3, **kw), learned(seed=3, loss_free_balance=True, **kw)
    x = torch.randn(6, 5, 8)
    ctx = lambda: ForwardContext(torch.tensor([[1] * 5] * 3 + [[0, 0, 1, 1, 1]] * 3))  # noqa: E731
    w0, _ = plain(x, ctx())
    w1, _ = lfb(x, ctx())
    assert torch.equal(w0, w1)


# --------------------------------------------------------------------------------------------- counting
def test_counts_are_the_selected_units_of_grad_enabled_training_forwards_only():
    rt = learned(fn="topk", top_k=2, loss_free_balance=True, granularity="token")
    with torch.no_grad():
        rt.balance_bias.copy_(torch.tensor([5.0, 5.0, -5.0]))  # every unit selects experts 0 and 1
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # 6 real tokens
    x = torch.randn(2, 4, 8)
    rt.eval()
    rt(x, ForwardContext(mask))
    rt.train()
    with torch.no_grad():  # GradCache's representation pass
        rt(x, ForwardContext(mask))
    done = ForwardContext(mask)
    done.done = True  # a gradient-checkpoint recompute
    rt(x, done)
    assert rt.balance_counts is None
    rt(x, ForwardContext(mask))
    assert torch.equal(rt.balance_counts, torch.tensor([6.0, 6.0, 0.0]))


def test_a_skipped_step_drops_the_counts_and_keeps_the_bias():
    rt = learned(fn="topk", top_k=2, loss_free_balance=True)
    holder = torch.nn.ModuleList([rt])
    rt(torch.randn(4, 5, 8), seq_ctx(4))
    assert rt.balance_counts is not None
    assert moe_lora.update_balance_bias(holder, 1, apply=False) == {}
    assert rt.balance_counts is None and not rt.balance_bias.any()


def build(tmp_path, task, **sections):
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), **sections)
    cfg = train.prepare(config.load_config(cfg_path), 0)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    return cfg, um


LFB = {"router": {"fn": "topk", "top_k": 2, "loss_free_balance": True, "bias_update_rate": 0.01},
       "adapters": {"shared": "routed"}, "train": {"aux_weights": {}}}


def test_gradcache_counts_each_unit_once_and_gives_the_same_bias_as_one_chunk(task, tmp_path):
    cfg, um = build(tmp_path, task, **LFB)
    routers = moe_lora.balance_routers(um.base)
    assert routers
    um.train()
    results = []
    for n_chunks in (1, 2):
        chunks = tiny_setup.step_chunks(um, task, 0, 4, n_chunks)
        n_units = sum(b["input_ids"].shape[0] for c in chunks for b in c.values() if b is not None)
        train.forward_backward(um, um, chunks, cfg, 1 + cfg.data.n_neg)
        um.zero_grad(set_to_none=True)
        counts = [r.balance_counts.clone() for r in routers]
        for c in counts:  # top-2 of 3: every sequence (query, document, pair) selects exactly two experts
            assert float(c.sum()) == 2 * n_units
        with torch.no_grad():
            before = [r.balance_bias.clone() for r in routers]
        moe_lora.update_balance_bias(um.base, 1)
        results.append((counts, [r.balance_bias.clone() for r in routers]))
        with torch.no_grad():
            for r, b in zip(routers, before):
                r.balance_bias.copy_(b)
    (c1, b1), (c2, b2) = results
    for a, b in zip(c1, c2):
        assert torch.equal(a, b)
    for a, b in zip(b1, b2):
        assert torch.equal(a, b)
    assert any(b.abs().sum() > 0 for b in b1)  # the step moved the bias


def test_dev_evaluation_in_the_middle_of_training_counts_nothing(task, tmp_path):
    # train.py evaluates between steps with the model left in training mode: the encoders switch to eval/no-grad
    import evaluate
    cfg, um = build(tmp_path, task, **LFB)
    um.train()
    evaluate.dev_evaluate(um, evaluate.load_dev(cfg), cfg)
    assert all(r.balance_counts is None for r in moe_lora.balance_routers(um.base))


# --------------------------------------------------------------------------------------------- files and config
def test_the_bias_is_saved_in_the_adapters_and_loaded_back(task, tmp_path):
    cfg, um = build(tmp_path, task, **LFB)
    with torch.no_grad():
        for i, r in enumerate(moe_lora.balance_routers(um.base)):
            r.balance_bias.copy_(torch.tensor([0.01, -0.02, 0.03]) * (i + 1))
            r.balance_counts = torch.ones(3)  # step state, never saved
    path = str(tmp_path / "adapters.safetensors")
    moe_lora.save_adapters(um.base, path)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("router.balance_bias") for k in keys) == len(moe_lora.balance_routers(um.base))
    _, fresh = build(tmp_path / "fresh", task, **LFB)
    moe_lora.detach(fresh.base)
    moe_lora.load_adapters(fresh.base, path)
    for a, b in zip(moe_lora.balance_routers(um.base), moe_lora.balance_routers(fresh.base)):
        assert torch.equal(a.balance_bias, b.balance_bias)
        assert b.balance_counts is None


def test_without_loss_free_balance_the_router_has_no_bias_buffer():
    # older adapter files (no bias key) keep loading strictly
    assert "balance_bias" not in learned(fn="topk", top_k=2).state_dict()


@pytest.mark.parametrize("overrides,key", [
    ({"router": {"fn": "softmax"}}, "router.fn"),
    ({"router": {"fn": "sparsemax"}}, "router.fn"),
    ({"router": {"fn": "entmax15"}}, "router.fn"),
    ({"router": {"fn": "sparsegen"}}, "router.fn"),
    ({"train": {"mode": "hard_switch"}, "adapters": {"shared": "always"}}, "router.loss_free_balance"),
    ({"router": {"kind": "retriever"}, "adapters": {"shared": "always"}}, "router.loss_free_balance"),
    ({"router": {"top_k": 3}}, "router.top_k"),
    ({"router": {"bias_update_rate": 0.0}}, "router.bias_update_rate"),
], ids=["softmax", "sparsemax", "entmax15", "sparsegen", "task_router", "retriever", "top_k_all", "rate"])
def test_a_combination_loss_free_balance_cannot_bias_is_a_config_error_naming_the_key(task, tmp_path, overrides,
                                                                                      key):
    sections = tiny_setup.merge(LFB, overrides)
    path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), **sections)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load_config(path)


# --------------------------------------------------------------------------------------------- toward balance
def test_the_bias_drives_a_skewed_router_toward_balance():
    # A router whose scores favour expert 0 for every input (its output bias); top-1 of 3, u = 0.01. With the bias
    # alone adapting (the router also trains, on a loss that ignores balance), the load spreads out. The sign rule
    # keeps oscillating around balance, so the end is judged by the mean MaxVio of the last 20 steps.
    rt = learned(fn="topk", top_k=1, loss_free_balance=True, bias_update_rate=0.01, seed=1)
    with torch.no_grad():
        rt.proj.bias.copy_(torch.tensor([2.0, 0.0, -0.5]))
    opt = torch.optim.SGD(rt.parameters(), lr=0.01)
    holder = torch.nn.ModuleList([rt])
    gen = torch.Generator().manual_seed(0)
    vio = []
    for _ in range(150):
        x = torch.randn(64, 5, 8, generator=gen)
        w, _ = rt(x, seq_ctx(64))
        loss = (w * torch.arange(3.0)).sum()  # any loss; balance plays no part in it
        opt.zero_grad()
        loss.backward()
        opt.step()
        vio.append(moe_lora.update_balance_bias(holder, 1)["lfb_maxvio"])
    assert vio[0] > 1.5  # nearly everything on expert 0 (MaxVio 2 = all of it)
    assert sum(vio[-20:]) / 20 < 0.25 * vio[0]
    assert rt.balance_bias[0] < 0 < rt.balance_bias[2]  # overloaded down, underloaded up


def test_a_tiny_run_logs_maxvio_and_the_bias_and_checkpoints_the_bias(task, tmp_path):
    sections = tiny_setup.merge(LFB, {"train": {"steps": 2, "eval_every": 2, "save_every": 2, "warmup_steps": 1}})
    path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), **sections)
    train.main([path])
    with open(tmp_path / "run" / "train_log.jsonl") as f:
        rows = [json.loads(x) for x in f]
    assert [r["step"] for r in rows] == [1, 2] and all(r["lfb_maxvio"] >= 0 for r in rows)
    ckpt = unimoer.checkpoint_dir(str(tmp_path / "run"))
    with safe_open(os.path.join(ckpt, "adapters.safetensors"), framework="pt") as f:
        biases = torch.stack([f.get_tensor(k) for k in f.keys() if k.endswith("balance_bias")])
    # two sign steps of u = 0.01 from 0: every entry in {-0.02, -0.01, 0, 0.01, 0.02}, and the log's max |b| is the
    # checkpoint's
    steps = biases / 0.01
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    assert float(steps.abs().max()) <= 2 + 1e-4
    assert rows[-1]["lfb_bias"] == pytest.approx(float(biases.abs().max()))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_a_two_rank_run_counts_the_global_batch_and_ends_with_the_bias_of_one_process(task, tmp_path):
    # The counts are all-reduced before the sign is taken, so two ranks with half the batch each move the bias
    # exactly as one process on the whole batch does (per-rank counts could take other signs).
    import socket
    import subprocess
    import sys
    from safetensors.torch import load_file

    sections = tiny_setup.merge(LFB, {"train": {"steps": 3, "eval_every": 3, "save_every": 3, "batch_size": 4,
                                                "warmup_steps": 1}})
    ddp_dir, one_dir = str(tmp_path / "ddp"), str(tmp_path / "one")
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, ddp_dir, **sections)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(tiny_setup.REPO, "train.py"), cfg_path]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=tiny_setup.SUBPROCESS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    train.main([cfg_path, f"--train.out_dir={one_dir}"])
    ddp, one = (load_file(os.path.join(unimoer.checkpoint_dir(d), "adapters.safetensors")) for d in (ddp_dir, one_dir))
    keys = [k for k in one if k.endswith("balance_bias")]
    assert keys and any(float(one[k].abs().max()) > 0 for k in keys)
    for k in keys:
        assert torch.equal(ddp[k], one[k]), k
