"""Experiment 8: a new expert and NLI task on a trained run (extend.py, nli.py, moe_lora.AddedExpert).

The spec: under router freeze the old tasks' outputs (query and document embeddings, rerank scores) of the
extended run are bit-identical (torch.equal) to the run it extends, with task routing (hard_switch_shared) and with
a learned router (joint_moe); with router grow the grown router's old columns and every old expert are unchanged
and the new column trains; the NLI files' format, its errors, the synthetic set, and the classification loss
against a hand-computed cross-entropy.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

import analysis
import evaluate
import extend
import losses
import moe_lora
import nli
import tiny_setup
import train
import unimoer
from config import ConfigError, NLI_LABELS, load_config
from data import DataError
from router import LearnedRouter


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


def base_run(root: str, task: str, mode: str) -> str:
    """A finished 4-step tiny run of `mode` in <root>/<mode> (4 steps at lr 1e-2: every expert non-zero)."""
    out = os.path.join(root, mode)
    cfg = tiny_setup.write_config(os.path.join(root, f"{mode}.yaml"), task, out,
                                  train={"mode": mode, "steps": 4, "eval_every": 4, "save_every": 4,
                                         "warmup_steps": 1})
    train.main([cfg])
    return out


def extension(root: str, from_run: str, name: str, router: str, steps: int = 4, **extra) -> tuple:
    """An extension of from_run trained `steps` steps in <root>/<name> -> (config path, run directory)."""
    out = os.path.join(root, name)
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"extend": {"from_run": from_run, "router": router, "data_dir": os.path.join(root, "nli"),
                                   "expert": {"name": "nli", "r": 4, "alpha": 8}, "max_len": 32, **extra},
                        "train": {"out_dir": out, "steps": steps, "eval_every": steps, "save_every": steps,
                                  "warmup_steps": 1, "batch_size": 8, "lr": 1e-2}}, f)
    train.main([path])
    return path, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("extend"))
    task = tiny_setup.write_synthetic(os.path.join(root, "task"))
    nli.make_synthetic_nli(os.path.join(root, "nli"), n_train=64, n_dev=16)
    out = {"root": root, "task": task}
    for mode in ("joint_moe", "hard_switch_shared"):
        out[mode] = base_run(root, task, mode)
        out[f"{mode}/freeze"] = extension(root, out[mode], f"{mode}_freeze", "freeze")[1]
    out["joint_moe/grow_cfg"], out["joint_moe/grow"] = extension(root, out["joint_moe"], "joint_moe_grow", "grow")
    return out


def old_task_outputs(run_dir: str, task: str) -> dict:
    """The old tasks' outputs of a run on fixed dev texts: query and document embeddings, rerank scores."""
    um = unimoer.load_run(run_dir)
    queries, docs = tiny_setup.fixed_batch(task, 6, 3)
    pairs = [(q, d) for q in queries for d in docs[:4]]
    return {"queries": torch.from_numpy(um.encode_queries(queries)),
            "docs": torch.from_numpy(um.encode_documents(docs)),
            "scores": torch.from_numpy(um.score_pairs([q for q, _ in pairs], [d for _, d in pairs]))}


def added_B(um) -> list:
    return [m.add_B for m in um.base.modules() if isinstance(m, moe_lora.MoELoRALinear) and m.add_B is not None]


# --------------------------------------------------------------------------------------------- router freeze
@pytest.mark.parametrize("mode", ["joint_moe", "hard_switch_shared"])
def test_freeze_leaves_the_old_tasks_outputs_bit_identical(runs, mode):
    before, after = old_task_outputs(runs[mode], runs["task"]), old_task_outputs(runs[f"{mode}/freeze"], runs["task"])
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("mode", ["joint_moe", "hard_switch_shared"])
def test_freeze_trains_the_added_expert_and_it_changes_the_new_tasks_output(runs, mode):
    """The test above could pass with a dead expert: here its B moved off zero and switching it off changes the
    NLI logits."""
    um = unimoer.load_run(runs[f"{mode}/freeze"])
    assert all(bool(b.abs().sum() > 0) for b in added_B(um))
    batch = extend.batch_inputs(um, nli.read_nli(os.path.join(runs["root"], "nli", "dev.jsonl"))[:4])["nli"]
    with torch.no_grad():
        on = um.nli_logits(batch)[0]
        for b in added_B(um):
            b.zero_()
        off = um.nli_logits(batch)[0]
    assert not torch.allclose(on, off)


def test_freeze_keeps_every_old_adapter_tensor_of_the_run(runs):
    old = unimoer.load_run(runs["joint_moe"])
    new = unimoer.load_run(runs["joint_moe/freeze"])
    old_sd, new_sd = moe_lora.adapter_state_dict(old.base), moe_lora.adapter_state_dict(new.base)
    assert set(new_sd) - set(old_sd) == {k for k in new_sd if k.endswith((".add_A", ".add_B"))}
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in old_sd)


def test_the_added_task_routes_to_the_added_expert_and_the_shared_one_only(runs):
    """Under freeze the NLI calls take the fixed gate: the stack's routed experts 0, the shared 1, the added 1."""
    um = unimoer.load_run(runs["joint_moe/freeze"])
    batch = extend.batch_inputs(um, nli.read_nli(os.path.join(runs["root"], "nli", "dev.jsonl"))[:3])["nli"]
    out, _ = um.run_base("nli", batch, capture_routing=True)
    names = [e.name for e in moe_lora.get_config(um.base).experts] + ["nli"]
    for _, w in out.routing:
        assert w.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3 and names == ["embed", "rerank", "shared", "nli"]


# --------------------------------------------------------------------------------------------- router grow
def grown(um) -> list:
    return [m.router for m in um.base.modules() if isinstance(m, moe_lora.MoEHook) and
            isinstance(m.router, LearnedRouter)]


def test_grow_keeps_the_old_router_columns_and_the_old_experts(runs):
    old, new = unimoer.load_run(runs["joint_moe"]), unimoer.load_run(runs["joint_moe/grow"])
    for r_old, r_new in zip(grown(old), grown(new)):
        n = r_old.proj.weight.shape[0]
        assert r_new.proj.weight.shape[0] == n + 1
        assert torch.equal(r_new.proj.weight[:n], r_old.proj.weight)
        assert torch.equal(r_new.proj.bias[:n], r_old.proj.bias)
    old_sd, new_sd = moe_lora.adapter_state_dict(old.base), moe_lora.adapter_state_dict(new.base)
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in old_sd if ".lora_" in k)


def test_grow_trains_the_new_router_column(runs):
    """Against the extended model as built before training (build_model is seeded: the same init)."""
    cfg = load_config(runs["joint_moe/grow_cfg"])
    cfg.model.path = os.path.join(runs["joint_moe/grow"], "base")  # as train.prepare resolves it
    start = extend.build_model(cfg, torch.device("cpu"))
    trained = unimoer.load_run(runs["joint_moe/grow"])
    for r0, r1 in zip(grown(start), grown(trained)):
        assert not torch.equal(r0.proj.weight[-1], r1.proj.weight[-1])
        assert not torch.equal(r0.proj.bias[-1], r1.proj.bias[-1])


def test_grow_routes_the_old_tasks_over_the_added_expert_too(runs):
    """The price of grow: the grown column weighs the added expert in every call (so the old outputs move)."""
    um = unimoer.load_run(runs["joint_moe/grow"])
    queries, docs = tiny_setup.fixed_batch(runs["task"], 4, 1)
    snap = unimoer.routing_snapshot(um, queries, docs, list(zip(queries, docs)))
    assert snap["experts"] == ["embed", "rerank", "shared", "nli"]
    assert all(0 < w[3] < 1 for w in snap["embed"]["weights"])


def test_grow_needs_a_learned_router(runs, tmp_path):
    with pytest.raises(ConfigError, match=r"extend\.router must be 'freeze' with router\.kind 'task'"):
        extension(str(tmp_path), runs["hard_switch_shared"], "bad", "grow")


def test_the_added_expert_targets_must_be_among_the_runs(runs, tmp_path):
    with pytest.raises(ConfigError, match=r"extend\.expert\.targets must be null or a non-empty list of distinct "
                                          r"projections among the run's adapters\.targets"):
        load_config_for(runs, tmp_path, expert={"targets": ["q", "qq"]})


def load_config_for(runs, tmp_path, **ext):
    path = tmp_path / "ext.yaml"
    path.write_text(yaml.safe_dump({"extend": {"from_run": runs["joint_moe"], **ext},
                                    "train": {"out_dir": str(tmp_path / "out")}}))
    return load_config(str(path))


def test_the_extension_config_is_the_runs_with_the_extensions_train_keys(runs, tmp_path):
    cfg = load_config_for(runs, tmp_path, expert={"targets": ["q", "v"]})
    run_cfg = unimoer.load_run(runs["joint_moe"]).cfg
    assert (cfg.train.mode, cfg.adapters, cfg.router, cfg.data) == (run_cfg.train.mode, run_cfg.adapters,
                                                                     run_cfg.router, run_cfg.data)
    assert cfg.train.out_dir == str(tmp_path / "out") and cfg.model.path is None  # the tiny base: copied
    assert cfg.extend.expert.targets == ["q", "v"]


# --------------------------------------------------------------------------------------------- the run files
def test_evaluate_reports_the_new_tasks_accuracy_next_to_the_old_tasks(runs):
    res = evaluate.evaluate_checkpoint(runs["joint_moe/freeze"], write=False)
    um = unimoer.load_run(runs["joint_moe/freeze"])
    dev = nli.read_nli(os.path.join(runs["root"], "nli", "dev.jsonl"))
    want = np.mean(extend.nli_predictions(um, dev) == np.array([e["label"] for e in dev]))
    assert res["nli"]["accuracy"] == pytest.approx(want) and res["nli"]["num_examples"] == 16
    assert "retrieval" in res and "two_stage" in res


def test_the_extended_run_resumes(runs, tmp_path):
    """--resume rebuilds the extension from its config (the run it extends, then its own checkpoint)."""
    path, out = extension(str(tmp_path), runs["joint_moe"], "ext", "freeze", steps=2,
                          data_dir=os.path.join(runs["root"], "nli"))
    train.main([path, "--resume", "--train.steps=3"])
    with open(os.path.join(out, "train_log.jsonl")) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3]


def test_analysis_reads_the_extended_run(runs):
    info = analysis.run_info(runs["joint_moe/freeze"])
    name, texts = analysis.eval_texts(info["cfg"], None, None, 4)
    res = analysis.routing(info, {name: texts})
    assert res["eval"][name]["experts"] == ["embed", "rerank", "shared", "nli"]


# --------------------------------------------------------------------------------------------- the NLI task
def test_nli_loss_is_the_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    by_hand = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
                + math.log(1 / (math.exp(0.5) + math.exp(1.5) + 1))) / 2
    assert float(losses.nli_loss(logits, labels)) == pytest.approx(by_hand, rel=1e-6)


def write_lines(tmp_path, *lines) -> str:
    path = tmp_path / "x.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_an_nli_file_reads_into_class_indices(tmp_path):
    path = write_lines(tmp_path, '{"premise": "p", "hypothesis": "h", "label": "contradiction", "id": "a"}')
    assert nli.read_nli(path) == [{"premise": "p", "hypothesis": "h", "label": NLI_LABELS.index("contradiction"),
                                   "id": "a"}]


def test_snli_lines_are_read_and_their_no_majority_lines_skipped(tmp_path):
    path = write_lines(tmp_path, '{"sentence1": "p", "sentence2": "h", "gold_label": "neutral", "pairID": "7"}',
                       '{"sentence1": "p", "sentence2": "h2", "gold_label": "-", "pairID": "8"}')
    assert nli.read_nli(path) == [{"premise": "p", "hypothesis": "h", "label": 1, "id": "7"}]


@pytest.mark.parametrize("line,message", [
    ('{"premise": "p", "hypothesis": "h"', r"x\.jsonl:2: invalid JSON"),
    ('{"premise": "p", "label": "neutral"}', r"x\.jsonl:2: missing \"hypothesis\""),
    ('{"premise": "p", "hypothesis": 3, "label": "neutral"}', r"x\.jsonl:2: \"hypothesis\" must be a string"),
    ('{"premise": "p", "hypothesis": "h", "label": "maybe"}', r"x\.jsonl:2: \"label\" must be one of entailment"),
    ('{"premise": "p", "hypothesis": "h", "label": "-"}', r"x\.jsonl:2: \"label\" must be one of"),
], ids=["not-json", "missing-field", "not-a-string", "unknown-label", "dash-outside-snli"])
def test_a_malformed_nli_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path, '{"premise": "p", "hypothesis": "h", "label": "entailment"}', line)
    with pytest.raises(DataError, match=message):
        nli.read_nli(path)


def test_the_synthetic_nli_set_is_byte_identical_for_the_same_seed(tmp_path):
    for d in ("a", "b"):
        nli.make_synthetic_nli(str(tmp_path / d), seed=3, n_train=50, n_dev=10)
    assert tiny_setup.read_tree(str(tmp_path / "a")) == tiny_setup.read_tree(str(tmp_path / "b"))


def test_the_synthetic_hypothesis_never_repeats_the_premises_value_word():
    """Entailment and contradiction differ only in synonyms the data teaches: word overlap cannot tell them."""
    train_set, _ = nli.synthetic_nli_examples(seed=0, n_train=300, n_dev=1)
    for ex in train_set:
        assert ex["hypothesis"].split()[-1] not in ex["premise"].split()
