"""train.py as a spec: reproducible runs, exact resume after a kill, atomic checkpoints, clear errors, padding
invariance, non-finite steps, load_run, staged training / frozen experts, and the seven modes.

Everything runs on a tiny synthetic task and a one-layer random base built in a temporary directory
(tiny_setup.py); a training step takes a few hundredths of a second on one thread.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import config
import moe_lora
import runs
import tiny_setup
import train
import unimoer
from config import ConfigError
from data import DataError

# The run most tests share: checkpoints at 3, 6, 8 (the last two kept), dev metrics at 0, 2, 4, 6, 8.
# Adapter dropout makes the steps draw from torch's RNG, so an exact resume needs the RNG state restored too.
RUN = dict(train={"steps": 8, "save_every": 3, "eval_every": 2}, adapters={"dropout": 0.1})


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("train") / "synthetic"))


@pytest.fixture(scope="module")
def finished_run(task, tmp_path_factory):
    """One uninterrupted run of RUN, in-process: (config path, out_dir, the trained in-memory UniMoER)."""
    root = tmp_path_factory.mktemp("finished")
    cfg_path = tiny_setup.write_config(str(root / "cfg.yaml"), task, str(root / "run"), **RUN)
    built = []
    build_model = unimoer.build_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
        train.main([cfg_path])
    return cfg_path, str(root / "run"), built[0]


def write_cfg(tmp_path, task, name="cfg.yaml", **sections) -> str:
    return tiny_setup.write_config(str(tmp_path / name), task, str(tmp_path / "run"), **sections)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def log_lines(out_dir) -> list:
    return [json.loads(x) for x in open(os.path.join(out_dir, "train_log.jsonl"))]


def latest(out_dir) -> str:
    return open(os.path.join(out_dir, "latest")).read().strip()


def adapters(ckpt) -> dict:
    return load_file(os.path.join(ckpt, "adapters.safetensors"))


def optimizer_tensors(ckpt) -> dict:
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=True)
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def expert_slices(um, name: str) -> dict:
    """{linear: (rows of A, columns of B)} of expert `name`, cloned."""
    out = {}
    for n, m in um.base.named_modules():
        if isinstance(m, moe_lora.MoELoRALinear):
            sl = m.expert_slice(name)
            out[n] = (m.lora_A.detach()[sl].clone(), m.lora_B.detach()[:, sl].clone())
    return out


def build(cfg_path, **overrides):
    """A UniMoER as main() builds it (base written to the run's out_dir first)."""
    cfg = config.load_config(cfg_path, [f"--{k}={v}" for k, v in overrides.items()])
    return unimoer.build_model(train.prepare(cfg, 0), torch.device("cpu"))


def init_model(out_dir):
    """The model a run started from: its saved config rebuilt (build_model seeds the expert init)."""
    return unimoer.build_model(config.load_config(os.path.join(out_dir, "config.yaml")), torch.device("cpu"))


# --------------------------------------------------------------------------------------------- reproducibility
def test_the_same_seed_twice_gives_byte_identical_metrics_and_logs(finished_run, tmp_path):
    cfg_path, first, _ = finished_run
    second = str(tmp_path / "again")
    train.main([cfg_path, f"--train.out_dir={second}"])
    assert [json.loads(x)["step"] for x in open(os.path.join(first, "metrics.jsonl"))] == [0, 2, 4, 6, 8]
    assert read(os.path.join(second, "metrics.jsonl")) == read(os.path.join(first, "metrics.jsonl"))
    assert read(os.path.join(second, "train_log.jsonl")) == read(os.path.join(first, "train_log.jsonl"))
    assert_same_tensors(adapters(unimoer.checkpoint_dir(second)), adapters(unimoer.checkpoint_dir(first)))


# A train.py run that hangs in the middle of writing checkpoint HANG_AT_STEP (its temporary directory holds the
# adapters but not yet the trainer state), so the SIGKILL lands at a known point: after steps past the last good
# checkpoint were logged (their lines must be dropped on resume) and with a half-written .tmp-ckpt-* left behind.
HANGING_TRAIN = """
import os, sys, time
sys.path.insert(0, {repo!r})
import moe_lora, runs, train

hang_at, marker, saving = int(os.environ["HANG_AT_STEP"]), os.environ["HANG_MARKER"], []
save_checkpoint, save_adapters = runs.save_checkpoint, moe_lora.save_adapters

def saving_checkpoint(um, opt, cfg, step, *args, **kwargs):
    saving[:] = [step]
    return save_checkpoint(um, opt, cfg, step, *args, **kwargs)

def hanging_save_adapters(model, path):
    save_adapters(model, path)
    if saving == [hang_at]:
        open(marker, "w").close()
        time.sleep(600)

train.save_checkpoint, moe_lora.save_adapters = saving_checkpoint, hanging_save_adapters
train.main(sys.argv[1:])
"""


def test_a_run_killed_mid_checkpoint_and_resumed_ends_identical_to_an_uninterrupted_run(finished_run, tmp_path):
    cfg_path, uninterrupted, _ = finished_run
    out = str(tmp_path / "killed")
    script = tmp_path / "hanging_train.py"
    script.write_text(HANGING_TRAIN.format(repo=tiny_setup.REPO))
    marker = tmp_path / "hanging"
    # Different hash seeds for the two halves (and the in-process reference): nothing may depend on set order.
    env = {**tiny_setup.SUBPROCESS_ENV, "HANG_AT_STEP": "6", "HANG_MARKER": str(marker), "PYTHONHASHSEED": "1"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), cfg_path, f"--train.out_dir={out}"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the run never reached checkpoint 6:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # What the kill left: `latest` still names the last complete checkpoint, and it loads; the half-written one
    # is only a .tmp-ckpt-* directory; the log runs past the checkpoint.
    assert latest(out) == "checkpoint-000003"
    ckpt = unimoer.checkpoint_dir(out)
    assert unimoer.load_run(out) is not None
    assert torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)["step"] == 3
    assert len(glob.glob(os.path.join(out, ".tmp-ckpt-*"))) == 1
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4, 5, 6]
    # The lock file still names the killed run, but the OS released its flock with the process: no stale lock.
    assert json.loads(open(os.path.join(out, runs.LOCK_FILE)).read())["pid"] == proc.pid

    res = subprocess.run([sys.executable, os.path.join(tiny_setup.REPO, "train.py"), cfg_path,
                          f"--train.out_dir={out}", "--resume"], env={**env, "PYTHONHASHSEED": "2"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert glob.glob(os.path.join(out, ".tmp-*")) == []  # the killed write's leftover was removed at the start

    assert latest(out) == latest(uninterrupted) == "checkpoint-000008"
    final, want = unimoer.checkpoint_dir(out), unimoer.checkpoint_dir(uninterrupted)
    assert_same_tensors(adapters(final), adapters(want))
    assert_same_tensors(optimizer_tensors(final), optimizer_tensors(want))
    assert read(os.path.join(out, "metrics.jsonl")) == read(os.path.join(uninterrupted, "metrics.jsonl"))
    assert read(os.path.join(out, "train_log.jsonl")) == read(os.path.join(uninterrupted, "train_log.jsonl"))


# --------------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_directory_is_complete_and_named_by_latest(finished_run):
    _, out, _ = finished_run
    assert latest(out) == "checkpoint-000008"
    ckpt = os.path.join(out, "checkpoint-000008")
    assert sorted(os.listdir(ckpt)) == ["adapters.safetensors", "config.yaml", "trainer_state.pt"]
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    assert state["step"] == 8 and state["bad_steps"] == 0
    assert yaml.safe_load(open(os.path.join(ckpt, "config.yaml")))["train"]["steps"] == 8
    # the two newest are kept, nothing temporary is left behind
    assert sorted(d for d in os.listdir(out) if "ckpt" in d or d.startswith("checkpoint")) == \
        ["checkpoint-000006", "checkpoint-000008"]


def test_a_failure_while_saving_keeps_the_previous_checkpoint_and_removes_its_temp_dir(task, tmp_path, monkeypatch):
    cfg_path = write_cfg(tmp_path, task, train={"steps": 6, "save_every": 3, "eval_every": 6})
    out = str(tmp_path / "run")
    torch_save = torch.save

    def failing_save(obj, path, *args, **kwargs):  # the disk fills up while checkpoint 6 is written
        if isinstance(obj, dict) and obj.get("step") == 6:
            raise OSError(28, "No space left on device")
        return torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", failing_save)
    with pytest.raises(runs.RunDirError, match=r"\.tmp-ckpt-\w+: writing checkpoint-000006 failed \(.*No space "
                       r"left on device\); the previous checkpoint \(checkpoint-000003\) is intact") as e:
        train.main([cfg_path])
    assert "\n" not in str(e.value)
    monkeypatch.undo()

    assert latest(out) == "checkpoint-000003"
    um = init_model(out)  # the checkpoint `latest` names loads whole, trainer state included
    assert runs.load_trainer_state(unimoer.checkpoint_dir(out), um,
                                    torch.optim.AdamW(unimoer.trainable_parameters(um))) == (3, 0)
    assert glob.glob(os.path.join(out, ".tmp-*")) == []  # the failed write took its temporary directory along

    train.main([cfg_path, "--resume"])
    assert latest(out) == "checkpoint-000006"
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4, 5, 6]


def test_load_run_rebuilds_the_trained_model(finished_run):
    _, out, trained = finished_run
    loaded = unimoer.load_run(out)
    queries = ["what is tovami", "find me ruke near the field please"]
    docs = ["a report notes", "the team saw some new old data from near every unit during the stage"]
    assert np.array_equal(loaded.encode_queries(queries), trained.encode_queries(queries))
    assert np.array_equal(loaded.encode_documents(docs), trained.encode_documents(docs))
    assert np.array_equal(loaded.score_pairs(queries, docs), trained.score_pairs(queries, docs))
    # and the trained experts are really in use (not an untrained model on both sides)
    assert not np.allclose(init_model(out).encode_queries(queries), trained.encode_queries(queries), atol=1e-4)


# --------------------------------------------------------------------------------------------- errors
def test_resume_without_a_checkpoint_is_one_clear_error(task, tmp_path):
    cfg_path = write_cfg(tmp_path, task)
    with pytest.raises(FileNotFoundError, match=r"--resume: .*run has no checkpoint"):
        train.main([cfg_path, "--resume"])
    assert not os.path.exists(tmp_path / "run")  # nothing was started


def test_a_fresh_run_into_an_existing_run_dir_is_one_clear_error(finished_run):
    cfg_path, out, _ = finished_run
    # run.lock included: the refused run held the lock while it looked, but writes its name only once accepted
    files = lambda: {p: read(p) for p in glob.glob(os.path.join(out, "**"), recursive=True)  # noqa: E731
                     if os.path.isfile(p)}
    before = files()
    with pytest.raises(FileExistsError, match=r"already holds a run; pass --resume"):
        train.main([cfg_path])
    assert files() == before  # nothing was overwritten


def test_an_unknown_key_in_the_yaml_is_one_config_error_naming_it(task, tmp_path):
    cfg_path = write_cfg(tmp_path, task, train={"lrr": 1})
    with pytest.raises(ConfigError, match=r"train: unknown key 'lrr'") as e:
        train.main([cfg_path])
    assert "\n" not in str(e.value)


def test_an_unknown_key_in_an_override_is_one_config_error_naming_it(task, tmp_path):
    with pytest.raises(ConfigError, match=r"train: unknown key 'lrr'") as e:
        train.main([write_cfg(tmp_path, task), "--train.lrr=1"])
    assert "\n" not in str(e.value)


def test_a_bad_choice_names_the_key_and_the_allowed_values(task, tmp_path):
    with pytest.raises(ConfigError) as e:
        train.main([write_cfg(tmp_path, task, train={"mode": "banana"})])
    assert "train.mode: 'banana' is not one of" in str(e.value)
    assert all(repr(m) in str(e.value) for m in config.MODES)


def test_a_bad_number_names_the_key_and_the_expected_type(task, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got 'abc'"):
        train.main([write_cfg(tmp_path, task, train={"lr": "abc"})])


def test_a_malformed_training_line_is_a_data_error_with_file_and_line(task, tmp_path):
    lines = open(os.path.join(task, "train.jsonl")).read().splitlines()
    bad = str(tmp_path / "train.jsonl")
    with open(bad, "w") as f:
        f.write("\n".join(lines[:2] + ['{"query": "cut off', *lines[2:]]) + "\n")
    with pytest.raises(DataError, match="^" + re.escape(f"{bad}:3: invalid JSON")):
        train.main([write_cfg(tmp_path, task, data={"train_file": bad})])


# --------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("pooling,bidirectional", [("last", False), ("first", True)])
def test_the_padding_side_changes_neither_embeddings_nor_scores(task, tmp_path, pooling, bidirectional):
    um = build(write_cfg(tmp_path, task, train={"pooling": pooling}, model={"bidirectional": bidirectional}))
    tiny_setup.randomize_lora_B(um, seed=0, std=0.2)  # active experts: the router and adapters see the padding too
    queries = ["what tovami", "find me any ruke and tovami in that report please", "is ruke"]
    docs = ["the a report notes that this record shows our team saw some new old data from near every field",
            "stage", "group part was has had been tovami"]
    outs = {}
    for side in ("left", "right"):
        um.cfg.data.padding_side = side
        mask = um.tokens_queries(queries)["attention_mask"]
        assert not bool(mask.all())  # texts of different lengths: there is padding to place
        assert bool((mask[:, 0] == 0).any()) == (side == "left")
        outs[side] = (um.encode_queries(queries), um.encode_documents(docs), um.score_pairs(queries, docs))
    for left, right in zip(outs["left"], outs["right"]):
        np.testing.assert_allclose(left, right, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- non-finite steps
def nan_loss_at(monkeypatch, bad_steps: set) -> None:
    """Make total_loss NaN at the given (1-based) steps: one call per step with grad_accum 1."""
    total_loss, calls = train.total_loss, []  # as the loop looks it up (maybe patched already)

    def patched(out, cfg, group):
        calls.append(1)
        loss, parts = total_loss(out, cfg, group)
        return (loss * float("nan"), parts) if len(calls) in bad_steps else (loss, parts)

    monkeypatch.setattr(train, "total_loss", patched)


def test_a_non_finite_step_is_skipped_without_touching_parameters_or_optimizer(task, tmp_path, monkeypatch):
    # Steps 2 and 4 are NaN; max_bad_steps 2 is not reached because step 3 is good in between.
    cfg_path = write_cfg(tmp_path, task, train={"steps": 4, "save_every": 1, "eval_every": 4, "max_bad_steps": 2})
    optimizers, seen = [], []  # what each step's forward starts from: parameters and AdamW state

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    total_loss = train.total_loss

    def recording_loss(out, cfg, group):
        opt = optimizers[0]
        seen.append(([p.detach().clone() for g in opt.param_groups for p in g["params"]],
                     {f"{i}.{k}": v.clone() for i, st in enumerate(opt.state.values()) for k, v in st.items()}))
        return total_loss(out, cfg, group)

    monkeypatch.setattr(train.torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(train, "total_loss", recording_loss)
    nan_loss_at(monkeypatch, {2, 4})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    assert [r["skipped"] for r in log_lines(out)] == [False, True, False, True]
    # step 3 starts where step 2 started: the skipped step moved neither the adapters nor AdamW's moments and count
    assert all(torch.equal(a, b) for a, b in zip(seen[2][0], seen[1][0]))
    assert_same_tensors(seen[2][1], seen[1][1])
    assert not all(torch.equal(a, b) for a, b in zip(seen[3][0], seen[2][0]))  # (step 3 itself did train)
    # Before issue 18 checkpoints were also written at the bad steps 2 and 4; a bad step now saves nothing, so the
    # run ends with `latest` at the last good step 3.
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-000001",
                                                                                 "checkpoint-000003"]
    assert latest(out) == "checkpoint-000003"


def test_max_bad_steps_non_finite_steps_in_a_row_stop_the_run_naming_the_last_good_checkpoint(
        task, tmp_path, monkeypatch):
    cfg_path = write_cfg(tmp_path, task, train={"steps": 10, "save_every": 2, "eval_every": 10, "max_bad_steps": 3})
    nan_loss_at(monkeypatch, set(range(3, 11)))
    out = str(tmp_path / "run")
    last_good = re.escape(os.path.join(out, "checkpoint-000002"))
    with pytest.raises(train.NonFiniteError, match=r"^3 bad steps in a row \(non-finite loss or gradient.*last: step "
                       r"5\); stopping\. The last good checkpoint is " + last_good + "$"):
        train.main([cfg_path])
    assert [r["skipped"] for r in log_lines(out)] == [False, False, True, True]  # step 5 raised before its log
    # Before issue 18 checkpoint 4 was written after 2 bad steps and the message only said "is in <out_dir>".
    assert latest(out) == "checkpoint-000002"
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-000002"]
    unimoer.load_run(out)


# --------------------------------------------------------------------------------------------- staged training
def test_freeze_experts_keeps_that_expert_bit_identical_while_the_others_train(task, tmp_path):
    # weight_decay > 0: AdamW's decay must not move the frozen expert either.
    cfg_path = write_cfg(tmp_path, task, train={"mode": "joint_moe", "steps": 3, "save_every": 3, "eval_every": 3,
                                                "freeze_experts": ["embed"], "weight_decay": 0.1})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    start, end = init_model(out), unimoer.load_run(out)
    for name, frozen in (("embed", True), ("rerank", False), ("shared", False)):
        a, b = expert_slices(start, name), expert_slices(end, name)
        for lin in a:
            same = (torch.equal(a[lin][0], b[lin][0]), torch.equal(a[lin][1], b[lin][1]))
            assert same == ((True, True) if frozen else (False, False)), (name, lin)


def test_stages_run_in_order_with_their_tasks_learning_rates_and_frozen_experts(task, tmp_path):
    stages = [{"steps": 3, "lr": 0.01, "tasks": "embed", "freeze_experts": ["rerank"]},
              {"steps": 3, "lr": 0.005, "tasks": "rerank"}]
    cfg_path = write_cfg(tmp_path, task, train={"stages": stages, "warmup_steps": 1, "min_lr_ratio": 0.1,
                                                "save_every": 3, "eval_every": 6})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    logs = log_lines(out)
    assert [r["tasks"] for r in logs] == [["embed"]] * 3 + [["rerank"]] * 3
    assert all("emb" in r and "rank" not in r for r in logs[:3]) and all("rank" in r and "emb" not in r
                                                                           for r in logs[3:])
    # per stage: 1 warmup step at the peak, then cosine to lr * min_lr_ratio: halfway is peak * (0.1 + 0.9 / 2)
    assert [r["lr"] for r in logs] == pytest.approx([0.01, 0.01, 0.0055, 0.005, 0.005, 0.00275])
    start, mid, end = (expert_slices(m, "rerank") for m in
                       (init_model(out), unimoer.load_run(os.path.join(out, "checkpoint-000003")), unimoer.load_run(out)))
    assert all(torch.equal(start[k][0], mid[k][0]) and torch.equal(start[k][1], mid[k][1]) for k in start)
    assert all(not torch.equal(mid[k][1], end[k][1]) for k in start)


# --------------------------------------------------------------------------------------------- modes
MODE_EXPERTS = {"emb_only": ["embed"], "rank_only": ["rerank"], "joint_single": ["joint"],
                "joint_moe": ["embed", "rerank", "shared"], "hard_switch": ["embed", "rerank"],
                "hard_switch_shared": ["embed", "rerank", "shared"], "no_shared": ["embed", "rerank"]}


@pytest.mark.parametrize("mode", config.MODES)
def test_each_mode_builds_its_experts_and_trains(task, tmp_path, mode):
    cfg_path = write_cfg(tmp_path, task, train={"mode": mode, "steps": 2, "save_every": 2, "eval_every": 2})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    um = unimoer.load_run(out)
    assert [e.name for e in moe_lora.get_config(um.base).experts] == MODE_EXPERTS[mode]
    logged = {k for r in log_lines(out) for k in r}
    assert ("emb" in logged) == (mode != "rank_only") and ("rank" in logged) == (mode != "emb_only")
    for name in MODE_EXPERTS[mode]:  # every expert of the mode received updates (B starts at zero)
        assert any(bool(b.abs().max() > 0) for _, b in expert_slices(um, name).values()), name


@pytest.mark.parametrize("mode", ["hard_switch", "hard_switch_shared"])
def test_hard_switch_gives_each_task_exactly_its_experts(task, tmp_path, mode):
    um = build(write_cfg(tmp_path, task), **{"train.mode": mode})
    tokens = um.tokens_queries(["what tovami", "is ruke", "find me any ruke"])
    tasks = torch.tensor([config.TASKS.index(t) for t in ("embed", "rerank", "embed")])
    out = um.base(tokens["input_ids"], tokens["attention_mask"], task_ids=tasks, capture_routing=True)
    assert [layer for layer, _ in out.routing] == list(range(um.base.config.num_hidden_layers))
    shared = [1.0] if mode == "hard_switch_shared" else []  # columns: embed, rerank(, shared), config order
    want = torch.tensor([[1.0, 0.0] + shared, [0.0, 1.0] + shared, [1.0, 0.0] + shared])
    for _, weights in out.routing:
        assert torch.equal(weights, want)


def test_a_learned_router_run_logs_routing_per_task_and_layer_at_each_dev_evaluation(finished_run):
    _, out, _ = finished_run
    lines = [json.loads(x) for x in open(os.path.join(out, "routing.jsonl"))]
    assert [r["step"] for r in lines] == [0, 2, 4, 6, 8]  # the dev evaluations of RUN
    for r in lines:
        assert r["experts"] == ["embed", "rerank", "shared"]
        for task in ("embed", "rerank"):
            w = np.array(r[task]["weights"])  # (layers, experts)
            assert w.shape == (1, 3)
            # softmax over the two routed experts, the always-on shared expert at 1
            assert np.allclose(w[:, :2].sum(1), 1.0, atol=1e-5) and np.allclose(w[:, 2], 1.0)
            assert all(0.0 <= h <= np.log(2) + 1e-6 for h in r[task]["entropy"])


def test_routing_entropy_is_the_mean_per_sequence_entropy_of_the_routed_weights(finished_run):
    _, _, um = finished_run
    queries, docs = ["what tovami", "is ruke"], ["tovami ruke", "ruke"]
    snap = unimoer.routing_snapshot(um, queries, docs, list(zip(queries, docs)))
    toks = um.tokens_pairs(queries, docs)
    out = um.base(toks["input_ids"], toks["attention_mask"], task_ids=torch.ones(2, dtype=torch.long),
                  capture_routing=True)
    p = out.routing[0][1][:, :2].double()  # (B, routed experts)
    want = float(-(p * p.log()).sum(-1).mean())  # by hand: H per sequence, then the mean
    assert snap["rerank"]["entropy"][0] == pytest.approx(want, abs=1e-5)


def test_a_run_without_a_learned_router_writes_no_routing_log(task, tmp_path):
    cfg_path = write_cfg(tmp_path, task, train={"mode": "hard_switch", "steps": 2, "save_every": 2, "eval_every": 2})
    train.main([cfg_path])
    assert not os.path.exists(tmp_path / "run" / "routing.jsonl")


def test_append_eos_false_pools_at_the_last_text_token(task, tmp_path):
    # For base models whose EOS is a sink token the embedding must come from the text itself.
    with_eos = build(write_cfg(tmp_path, task))
    without = build(write_cfg(tmp_path, task, name="noeos.yaml"), **{"data.append_eos": "false"})
    texts = ["what tovami", "find me any ruke"]
    a, b = with_eos.tokens_documents(texts), without.tokens_documents(texts)
    last = lambda t: t["input_ids"][:, -1].tolist()  # noqa: E731  (left padding: the last column is the end)
    assert last(a) == [with_eos.tok.eos_id] * 2 and with_eos.tok.eos_id not in last(b)
    real = lambda t: [ids[m.bool()].tolist() for ids, m in zip(t["input_ids"], t["attention_mask"])]  # noqa: E731
    assert [r[:-1] for r in real(a)] == real(b)  # the same text tokens, only the EOS dropped
