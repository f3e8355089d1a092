"""Matryoshka Representation Learning (Kusupati et al. 2022) as a spec: the loss (losses.matryoshka_loss) is the
weighted sum of InfoNCE on the truncated, renormalised prefixes, with the full width always one of the dims and
weights 1 by default; its config keys are validated; GradCache and the log are unchanged in kind; evaluate.py
--dim cuts the embeddings like a hand truncation does, and metrics.json "matryoshka" holds retrieval per dim.

The truncated prefixes are computed here by hand (slice, divide by the row norm), not with the code under test;
the 2x2 case is evaluated with math.log on explicit numbers. The evaluation tests train a 4-step run of
tiny_setup's task (width 32) with matryoshka_dims [8, 16].
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import config
import evaluate as ev
import ir
import losses
import tiny_setup
import train
import unimoer
from config import ConfigError

DIMS = [8, 16]  # of the evaluation run; its width (tiny_setup) is 32
WIDTH = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def prefix_by_hand(x: torch.Tensor, m: int) -> torch.Tensor:
    """The first m columns of x, each row divided by its own norm."""
    return unit_rows(x[:, :m].clone())


def random_batch(b=3, g=2, h=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return unit_rows(torch.randn(b, h, generator=gen)), unit_rows(torch.randn(b * g, h, generator=gen))


# --------------------------------------------------------------------------------------------- the loss
def test_matryoshka_loss_is_the_weighted_sum_of_info_nce_on_truncated_renormalised_prefixes():
    q, d = random_batch()
    got, parts = losses.matryoshka_loss(q, d, [2, 4], [0.5, 2.0], 0.1, cross_device=False)
    by_dim = {m: losses.info_nce_loss(prefix_by_hand(q, m), prefix_by_hand(d, m), 0.1, cross_device=False)
              for m in (2, 4)}
    full = losses.info_nce_loss(q, d, 0.1, cross_device=False)  # the full width 8 is in M with c = 1 (paper)
    assert got.item() == pytest.approx(0.5 * by_dim[2].item() + 2.0 * by_dim[4].item() + full.item(), abs=1e-6)
    assert sorted(parts) == [2, 4, 8]
    for m in (2, 4):
        assert parts[m].item() == pytest.approx(by_dim[m].item(), abs=1e-6)


def test_matryoshka_loss_of_a_2x2_batch_equals_the_hand_computed_value():
    # q0 = (.6, .8), q1 = (-.8, .6); d0 = (.8, .6), d1 = (-.6, .8); temperature 1; dims [1] with c_1 = 2, and the
    # full width 2 with c = 1.
    # m = 1: the prefixes renormalised are q = (1, -1), d = (1, -1): scores [[1, -1], [-1, 1]], so each row's
    #        loss is -1 + log(e^1 + e^-1) = log(1 + e^-2).
    # m = 2: q.d = [[.96, .28], [-.28, .96]]: rows log(1 + e^(.28 - .96)) and log(1 + e^(-.28 - .96)).
    q = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    d = torch.tensor([[0.8, 0.6], [-0.6, 0.8]])
    l1 = math.log(1 + math.exp(-2.0))
    l2 = (math.log(1 + math.exp(-0.68)) + math.log(1 + math.exp(-1.24))) / 2
    got, parts = losses.matryoshka_loss(q, d, [1], [2.0], 1.0, cross_device=False)
    assert parts[1].item() == pytest.approx(l1, abs=1e-6)
    assert parts[2].item() == pytest.approx(l2, abs=1e-6)
    assert got.item() == pytest.approx(2.0 * l1 + l2, abs=1e-6)


def test_matryoshka_weights_default_to_one_per_dim():
    assert config.TrainSection().matryoshka_weights == [] and config.TrainSection().matryoshka_dims == []
    q, d = random_batch(seed=1)
    got, parts = losses.matryoshka_loss(q, d, [2, 4], [], 0.1, cross_device=False)
    assert got.item() == pytest.approx(sum(p.item() for p in parts.values()), abs=1e-6)


def test_listing_the_full_width_counts_it_once_with_its_listed_weight():
    q, d = random_batch(seed=2)
    got, parts = losses.matryoshka_loss(q, d, [8, 2], [3.0, 1.0], 0.1, cross_device=False)
    assert sorted(parts) == [2, 8]
    assert got.item() == pytest.approx(3.0 * parts[8].item() + parts[2].item(), abs=1e-6)


def test_a_dim_above_the_embedding_width_is_an_error_naming_the_key():
    q, d = random_batch(h=8)
    with pytest.raises(ValueError, match=r"train\.matryoshka_dims \[16\]: dims must be <= the embedding width 8"):
        losses.matryoshka_loss(q, d, [16], [], 0.1, cross_device=False)


def test_total_loss_logs_the_matryoshka_sum_as_emb_and_each_dims_info_nce():
    q, d = random_batch(seed=3)
    cfg = config.Config()
    cfg.train.matryoshka_dims, cfg.train.emb_weight, cfg.train.temperature = [2, 4], 0.5, 0.1
    loss, logged = losses.total_loss({"q": q, "d": d, "aux": {}}, cfg, 2)
    plain = losses.info_nce_loss(q, d, 0.1, cross_device=False).item()
    assert logged.keys() == {"emb", "emb@2", "emb@4", "emb@8"}
    assert logged["emb@8"] == pytest.approx(plain, abs=1e-6)  # the full width: a plain run's "emb"
    assert logged["emb"] == pytest.approx(logged["emb@2"] + logged["emb@4"] + logged["emb@8"], abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * logged["emb"], abs=1e-6)  # emb_weight multiplies the sum


# --------------------------------------------------------------------------------------------- config
def cfg_of(**train_keys):
    return config.config_from_dict({"train": train_keys}, "cfg.yaml")


@pytest.mark.parametrize("keys,message", [
    ({"matryoshka_dims": [16, 0]}, r"train\.matryoshka_dims\[1\] must be >= 1 \(got 0\)"),
    ({"matryoshka_dims": [16, 16]}, r"train\.matryoshka_dims must be distinct \(got \[16, 16\]\)"),
    ({"matryoshka_dims": [16, 32], "matryoshka_weights": [1.0]},
     r"train\.matryoshka_weights must be \[\] \(all 1\) or one weight per entry of train\.matryoshka_dims"),
    ({"matryoshka_weights": [1.0]}, r"train\.matryoshka_weights must be \[\] \(all 1\) or one weight per entry"),
    ({"matryoshka_dims": [16, 32], "matryoshka_weights": [1.0, -1.0]},
     r"train\.matryoshka_weights\[1\] must be >= 0 \(got -1\.0\)"),
    ({"matryoshka_dims": [16, 256]}, r"train\.matryoshka_dims must be dims <= model\.tiny\.hidden_size 128"),
    ({"matryoshka_dims": [16], "mode": "rank_only"},
     r"train\.matryoshka_dims must be \[\] with train\.mode rank_only, which trains no embedding"),
], ids=["below_one", "repeated", "weights_length", "weights_without_dims", "negative_weight", "above_tiny_width",
        "rank_only"])
def test_bad_matryoshka_keys_are_one_config_error_naming_the_key(keys, message):
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: " + message):
        cfg_of(**keys)


def test_matryoshka_dims_above_a_model_directorys_hidden_size_are_an_error_before_anything_is_built(tmp_path):
    # A model directory's width is known from its config.json only: train.check_inputs reads it.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1}))
    cfg = config.config_from_dict({"model": {"path": str(model_dir)}, "train": {"matryoshka_dims": [16, 64]}},
                                  "cfg.yaml")
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: train\.matryoshka_dims must be dims <= 32, the hidden "
                                          r"size of .*model \(got \[16, 64\]\)"):
        train.check_inputs(cfg, "cfg.yaml")


def test_the_tiny_matryoshka_config_loads_with_its_dims():
    cfg = config.load_config(os.path.join(tiny_setup.REPO, "configs", "tiny_matryoshka.yaml"))
    assert cfg.train.matryoshka_dims == [16, 32, 64] and cfg.model.tiny.hidden_size == 64


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("mrl") / "synthetic"))


def test_gradcache_with_matryoshka_equals_one_step_on_the_whole_batch(task, tmp_path):
    # The truncation happens in the loss on the cached full vectors, so GradCache stays exact.
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"),
                                       train={"matryoshka_dims": [4, 8], "matryoshka_weights": [2.0, 0.5]})
    cfg = train.prepare(config.load_config(cfg_path), 0)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    um.train()

    def grads():
        out = {n: p.grad.detach().clone() for n, p in um.named_parameters() if p.grad is not None}
        um.zero_grad(set_to_none=True)
        return out

    group = 1 + cfg.data.n_neg
    _, whole_log = train.forward_backward(um, um, tiny_setup.step_chunks(um, task, 0, 4, 1), cfg, group)
    whole = grads()
    _, gc_log = train.forward_backward(um, um, tiny_setup.step_chunks(um, task, 0, 4, 2), cfg, group)
    gc = grads()
    assert {"emb", "emb@4", "emb@8", "emb@32"} <= whole_log.keys() == gc_log.keys()
    for k in whole_log:
        assert gc_log[k] == pytest.approx(whole_log[k], abs=1e-5), k
    assert any(float(g.abs().max()) > 1e-3 for g in whole.values())  # not a comparison of zeros
    for name, g in whole.items():
        # fp32 rounding of other padding (chunks vs the whole batch), relative to the gradient's scale (up to ~40
        # here: the loss sums three InfoNCE terms with weights up to 2)
        scale = max(1.0, float(g.abs().max()))
        torch.testing.assert_close(gc[name], g, atol=1e-5 * scale, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def run(task, tmp_path_factory):
    """A finished 4-step joint_moe run with matryoshka_dims [8, 16] (dev evaluation at steps 0 and 4)."""
    root = tmp_path_factory.mktemp("mrl_run")
    cfg = tiny_setup.write_config(str(root / "cfg.yaml"), task, str(root / "run"),
                                  train={"steps": 4, "eval_every": 4, "save_every": 4, "rerank_topk": 5,
                                         "matryoshka_dims": DIMS})
    train.main([cfg])
    return str(root / "run")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_training_logs_the_matryoshka_sum_and_each_dims_part(run):
    for row in read_jsonl(os.path.join(run, "train_log.jsonl")):
        parts = [row[f"emb@{m}"] for m in DIMS + [WIDTH]]
        assert row["emb"] == pytest.approx(sum(parts), rel=1e-6)


def test_dev_metrics_hold_retrieval_per_dim_with_the_full_width_equal_to_emb_ndcg(run):
    for row in read_jsonl(os.path.join(run, "metrics.jsonl")):
        assert {f"emb@{m}_ndcg@10" for m in DIMS + [WIDTH]} <= row.keys()
        assert row[f"emb@{WIDTH}_ndcg@10"] == row["emb_ndcg@10"]  # the same encoding and search


# --------------------------------------------------------------------------------------------- evaluate.py
def hand_truncated_ranking(run, task, dim, k=10):
    """Each test query's top k documents by cosine of the full embeddings cut by hand to their first dim dims."""
    um = unimoer.load_run(run)
    corpus, queries, _ = ev.load_split(task, "test")
    doc_ids, qids = list(corpus), list(queries)
    d = um.encode_documents([corpus[x] for x in doc_ids])
    q = um.encode_queries([queries[x] for x in qids])
    assert d.shape[1] == WIDTH  # the full vectors
    d, q = d[:, :dim] / np.linalg.norm(d[:, :dim], axis=1, keepdims=True), \
        q[:, :dim] / np.linalg.norm(q[:, :dim], axis=1, keepdims=True)
    scores = q.astype(np.float64) @ d.astype(np.float64).T
    return {qid: ([doc_ids[j] for j in np.argsort(-scores[i], kind="stable")[:k]], scores[i])
            for i, qid in enumerate(qids)}, doc_ids


@pytest.fixture(scope="module")
def at_dim_8(run, task, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mrl_eval") / "dim8")
    return ev.evaluate_checkpoint(run, task, "test", k_rerank=5, out_dir=out, progress=False, drop_self="off",
                                  dim=8), out


def test_dim_gives_the_ranking_of_a_hand_truncated_encoding(run, task, at_dim_8):
    result, out = at_dim_8
    hand, doc_ids = hand_truncated_ranking(run, task, 8)
    dense = ir.read_trec_run(os.path.join(out, "run.retrieval.trec"))
    assert dense.keys() == hand.keys()
    for qid, (top, scores) in hand.items():
        assert ir.rank_documents(dense[qid])[:10] == top, qid
        for doc, s in dense[qid].items():  # the run's scores are the hand-truncated cosines
            assert s == pytest.approx(scores[doc_ids.index(doc)], abs=1e-5)
    assert result["provenance"]["embed_dim"] == 8 and result["provenance"]["hidden_size"] == WIDTH


def test_the_per_dim_table_holds_the_runs_dims_and_its_full_width_entry_is_the_retrieval_stage(run, task):
    result = ev.evaluate_checkpoint(run, task, "test", k_rerank=5, write=False, progress=False, drop_self="off")
    assert list(result["matryoshka"]) == ["8", "16", "32"]  # the run's dims plus the full width
    assert result["matryoshka"]["32"] == result["retrieval"]
    assert result["provenance"]["embed_dim"] == WIDTH


def test_the_tables_entry_at_a_dim_equals_evaluating_at_that_dim(run, task, at_dim_8):
    # The table cuts one full-width encoding; --dim cuts in the encoder: two paths to the same figures.
    full = ev.evaluate_checkpoint(run, task, "test", k_rerank=5, write=False, progress=False, drop_self="off")
    assert full["matryoshka"]["8"] == pytest.approx(at_dim_8[0]["retrieval"], abs=1e-9)


def test_with_dim_the_table_stops_at_the_evaluated_width(at_dim_8):
    result, _ = at_dim_8
    assert list(result["matryoshka"]) == ["8"] and result["matryoshka"]["8"] == result["retrieval"]


def test_dims_flag_sets_the_table_and_the_summary_line_shows_it(run, task, capsys):
    argv = [run, "--data", task, "--k-rerank", "5", "--dims", "4", "8", "--no-write", "--device", "cpu"]
    assert ev.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(line["matryoshka_ndcg@10"]) == ["4", "8", "32"]
    assert line["matryoshka_ndcg@10"]["32"] == line["retrieval"]["ndcg@10"]


@pytest.mark.parametrize("kwargs,message", [
    ({"dim": 0}, r"dim must be a positive integer, got 0"),
    ({"dim": 33}, r"dim must be an integer in \[1, 32\] \(the embedding width of the model\), got 33"),
    ({"dims": [8, 64]}, r"dims \[64\]: each must be <= 32, the evaluated embedding width"),
    ({"dim": 8, "dims": [16]}, r"dims \[16\]: each must be <= 8, the evaluated embedding width"),
], ids=["dim_zero", "dim_above_width", "dims_above_width", "dims_above_dim"])
def test_a_bad_dim_is_one_clear_error(run, task, kwargs, message):
    with pytest.raises(ir.EvalError, match=message):
        ev.evaluate_checkpoint(run, task, "test", write=False, progress=False, **kwargs)
