"""DDP as a spec: two CPU ranks (gloo, under torchrun) compute exactly what one process computes on the
concatenated batch.

* the cross-device InfoNCE loss and its gradients (after DDP's averaging) equal one process's on the global batch;
* a whole training step (InfoNCE, rerank loss, router aux losses over the global batch: train.aux_scope
  "global") equals one process's on the global batch, in one chunk per rank and with GradCache chunks;
* a whole train.py run on 2 ranks ends with the adapters of a 1-process run with the same global batch.

Each test launches `python -m torch.distributed.run --nproc_per_node=2` as a subprocess (a few seconds each).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import config
import losses
import runs
import tiny_setup
import train
import unimoer

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 240  # seconds per torchrun launch; a hung collective fails the test instead of hanging the suite

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("ddp") / "synthetic"))


@pytest.fixture(scope="module")
def base_dir(task, tmp_path_factory):
    """The tiny random base written once, so the workers and the reference load the very same weights."""
    root = tmp_path_factory.mktemp("ddp_base")
    cfg = config.load_config(tiny_setup.write_config(str(root / "cfg.yaml"), task, str(root / "unused")))
    runs.write_tiny_base(cfg, str(root / "base"))
    return str(root / "base")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=tiny_setup.SUBPROCESS_ENV)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


# The worker's step: every loss on, the aux losses over the global batch (the default scope).
STEP_TRAIN = {"aux_weights": {"load_balance": 0.5, "z_loss": 0.1, "entropy": 0.1}, "aux_scope": "global"}


@pytest.fixture(scope="module")
def worker(task, base_dir, tmp_path_factory):
    """One torchrun launch of ddp_worker.py -> (config path, its output directory)."""
    out = tmp_path_factory.mktemp("ddp_worker")
    cfg_path = tiny_setup.write_config(str(out / "cfg.yaml"), task, str(out / "unused"), model={"path": base_dir},
                                       train=STEP_TRAIN)
    torchrun(os.path.join(HERE, "ddp_worker.py"), cfg_path, str(out))
    return cfg_path, out


def test_cross_device_infonce_loss_and_grads_equal_one_process_on_the_concatenated_batch(task, worker):
    cfg_path, out = worker
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # The reference: one process, no process group, the global batch = rank 0's queries then rank 1's (docs
    # likewise, so query i's positive stays at row i * g). Each rank's texts are embedded as that rank embedded
    # them (one forward per slice: the same padding, hence the same fp32 rounding), so the comparison isolates
    # the loss and DDP's gradient averaging; a forward over the whole batch pads differently and moves gradients
    # of size ~5 by a few 1e-6 (padding invariance itself is test_train.py's business, at 1e-5).
    cfg = config.load_config(cfg_path)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    queries, docs = tiny_setup.fixed_batch(task, 4, cfg.data.n_neg)
    b, g = 2, 1 + cfg.data.n_neg
    q = torch.cat([um.embed(um.tokens_queries(queries[r * b:(r + 1) * b]))[0] for r in (0, 1)])
    d = torch.cat([um.embed(um.tokens_documents(docs[r * b * g:(r + 1) * b * g]))[0] for r in (0, 1)])
    loss = losses.info_nce_loss(q, d, cfg.train.temperature, cross_device=False)
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in um.named_parameters() if p.requires_grad}

    assert any(float(g.abs().max()) > 1e-4 for g in grads.values())  # the comparison is not between zeros
    for r, got in enumerate(ranks):
        assert got["world"] == 2
        assert got["loss"] == pytest.approx(loss.item(), abs=1e-6), f"rank {r}"
        assert got["grads"].keys() == grads.keys()
        for name, g in grads.items():
            # (a missing world_size scaling would be off by a factor of 2, a missing gather by far more)
            torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-6, msg=f"rank {r}: {name}")


@pytest.mark.parametrize("chunks", [1, 2], ids=["one_chunk", "gradcache"])
def test_a_ddp_step_with_global_aux_losses_equals_one_process_on_the_concatenated_batch(task, worker, chunks):
    # Each rank trains on 2 of the 4 queries (as 1 chunk, or 2 GradCache chunks of 1). The reference is one
    # process, one chunk of all 4: load balance N sum_i f_i P_i is a product of global-batch means, which only
    # the all-reduced statistics reproduce (per-rank "step" balancing gives 0.478 here against 0.559).
    cfg_path, out = worker
    ranks = [torch.load(out / f"rank{r}.{chunks}chunk.pt", weights_only=True) for r in (0, 1)]
    cfg = config.load_config(cfg_path)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    um.train()
    _, logs = train.forward_backward(um, um, tiny_setup.step_chunks(um, cfg.data.dir, 0, 4, 1), cfg,
                                     1 + cfg.data.n_neg)
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in um.named_parameters() if p.requires_grad}

    assert logs.keys() == {"emb", "rank", "load_balance", "z_loss", "entropy", "tsallis"}
    for r, got in enumerate(ranks):
        for k in ("emb", "load_balance", "z_loss", "entropy", "tsallis"):  # global-batch values on every rank
            assert got["logs"][k] == pytest.approx(logs[k], abs=1e-5), (r, k)
    # the rerank loss is each rank's local mean; equal local sizes make their average the global mean
    assert (ranks[0]["logs"]["rank"] + ranks[1]["logs"]["rank"]) / 2 == pytest.approx(logs["rank"], abs=1e-5)
    assert any(float(g.abs().max()) > 1e-3 for g in grads.values())
    for r, got in enumerate(ranks):
        for name, g in grads.items():
            # (the whole batch pads to other lengths than each rank's part: fp32 rounding moves ~1e-6)
            torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-5, msg=f"rank {r}: {name}")


def test_two_rank_training_run_ends_with_the_adapters_of_a_one_process_run(task, tmp_path):
    # Equal by construction: the sampler splits each global batch over the ranks, InfoNCE sees the gathered
    # global batch with the world_size scaling, BCE is a local mean over equal local sizes, so DDP's gradient
    # average is the global mean's gradient, and the router aux losses (load balance included) are taken over
    # the global batch (train.aux_scope "global", the default; load-balance weight 1 so that per-rank balancing,
    # "step", would be off by ~9e-4 here).
    two_rank_run_matches_one_process(task, tmp_path, {})


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm", "famo"])
def test_a_two_rank_run_with_a_multi_task_method_ends_with_the_adapters_of_a_one_process_run(task, tmp_path, method):
    # train.mtl under DDP: PCGrad's and GradNorm's per-task gradients are averaged over the ranks before the
    # surgery / the norms (a per-rank surgery or per-rank norms would differ), and the task weights come from the
    # global loss values (FAMO's from its extra forward too), so two ranks take one process's steps.
    two_rank_run_matches_one_process(task, tmp_path, {"mtl": method})


def two_rank_run_matches_one_process(task, tmp_path, extra_train: dict) -> None:
    sections = dict(train={"steps": 4, "eval_every": 4, "save_every": 2, "cross_device_negatives": True,
                           "batch_size": 4, "aux_weights": {"load_balance": 1.0, "z_loss": 0.01}, **extra_train})
    ddp_dir, one_dir = str(tmp_path / "ddp"), str(tmp_path / "one")
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, ddp_dir, **sections)
    torchrun(os.path.join(tiny_setup.REPO, "train.py"), cfg_path)
    train.main([cfg_path, f"--train.out_dir={one_dir}"])

    assert open(os.path.join(ddp_dir, "latest")).read().strip() == "checkpoint-000004"
    ddp = load_file(os.path.join(unimoer.checkpoint_dir(ddp_dir), "adapters.safetensors"))
    one = load_file(os.path.join(unimoer.checkpoint_dir(one_dir), "adapters.safetensors"))
    assert ddp.keys() == one.keys()
    # Up to fp32 rounding, which Adam amplifies in one place: an entry whose gradient is ~1e-8 (Adam's eps) moves
    # by lr * g / (|g| + eps), so rounding noise of ~1e-10 in it (the ranks pad their batches to other lengths)
    # changes its update by ~1e-5; here about one entry in a few hundred of the lora_A tensors, at step 2, where B
    # is still tiny. So: every entry within 1e-4 (a typical update here is 7e-3: a wrong loss scaling or batch
    # split moves most entries by ~1e-3), and all but 1% of the entries within 1e-6.
    for name in one:
        diff = (ddp[name] - one[name]).abs()
        assert float(diff.max()) < 1e-4, name
        assert float((diff > 1e-6).float().mean()) < 0.01, name
    # The logged InfoNCE is the global batch's mean on both (rank 0 logs it; the DDP scaling is divided out).
    logs = [[json.loads(x) for x in open(os.path.join(d, "train_log.jsonl"))] for d in (ddp_dir, one_dir)]
    assert [r["emb"] for r in logs[0]] == pytest.approx([r["emb"] for r in logs[1]], abs=1e-5)


def test_a_locked_run_dir_stops_every_rank_with_one_error_line_instead_of_hanging(task, tmp_path):
    # Only rank 0 takes the run lock; its error is broadcast, so rank 1 does not wait forever at the setup barrier.
    out = str(tmp_path / "run")
    os.makedirs(out)
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, out)
    held = runs.RunLock(out, ["another run"])  # the holder: this test process
    held.claim()
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", os.path.join(tiny_setup.REPO, "train.py"), cfg_path]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=tiny_setup.SUBPROCESS_ENV)
    finally:
        held.release()
    assert res.returncode != 0
    # (the two ranks write to one stderr at once, so their lines may interleave: count in the whole text)
    text = res.stdout + res.stderr
    assert text.count("train.py: error: ") == 2, res.stderr[-3000:]
    assert f"{out}: in use by another run (pid {os.getpid()} on" in text  # rank 0
    assert f"rank 0 could not open {out}: RunDirError: {out}: in use" in text  # rank 1
    assert not os.path.exists(os.path.join(out, "latest"))
