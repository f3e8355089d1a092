"""Jina-Reranker-v3's listwise cross-encoder (train.rerank_head jina_v3; Wang et al. 2025, arXiv 2509.25085;
official code huggingface.co/jinaai/jina-reranker-v3 modeling.py): the query and a list of documents in one causal
sequence, each document scored by the cosine of its marker state against the query marker's, through the projector.

References: the sequence against format_docs_prompts_func's prompt written out here; the scores against the
projector applied by hand to the base's hidden states at the markers; padding side and batching against each list
scored alone; the softmax CE and the block merge against values worked out by hand.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
import listwise
import losses
import tiny_setup
import train
import unimoer
from model import ConfigError

JINA = {"rerank_head": "jina_v3", "rerank_loss": "group"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("jina") / "synthetic"))


def build(tmp_path, task, padding_side="left", **sections):
    """A tiny jina_v3 model (joint_moe: a learned router reads the whole list; the bare frame unless told, short
    sequences), every expert's B random so the adapters act."""
    sections["train"] = {**JINA, **sections.get("train", {})}
    sections["data"] = {"padding_side": padding_side, "rerank_prompt": "bare", **sections.get("data", {})}
    cfg_path = tiny_setup.write_config(str(tmp_path / f"cfg_{padding_side}.yaml"), task, str(tmp_path / "run"),
                                       **sections)
    cfg = train.prepare(config.load_config(cfg_path), 0)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    return cfg, um.eval()


def lists_of(task, n_lists=3):
    """Queries and document lists of different lengths (4, 2, 3 documents)."""
    queries, docs = tiny_setup.fixed_batch(task, n_lists, 3)
    sizes = [4, 2, 3][:n_lists]
    return queries, [docs[i * 4:i * 4 + k] for i, k in enumerate(sizes)]


# --------------------------------------------------------------------------------------------- the sequence
def test_the_qwen3_frame_sequence_is_format_docs_prompts_funcs_prompt_with_our_markers(task, tmp_path):
    _, um = build(tmp_path, task, data={"rerank_prompt": "qwen3"})
    ids, doc_pos, query_pos = um.list_tokens.sequence("fox", ["a red fox", "a dog"])
    system = ("You are a search relevance expert who can determine a ranking of the passages based on how relevant "
              "they are to the query. If the query is a question, how relevant a passage is depends on how well it "
              "answers the question. If not, try to analyze the intent of the query and assess how well each "
              "passage satisfies the intent. If an instruction is provided, you should follow the instruction when "
              "determining the ranking.")
    want = ("<|im_start|>system\n" + system + "<|im_end|>\n<|im_start|>user\n"
            "I will provide you with 2 passages, each indicated by a numerical identifier. Rank the passages based "
            "on their relevance to query: fox\n"
            '<passage id="0">\na red fox<|endoftext|>\n</passage>\n<passage id="1">\na dog<|endoftext|>\n</passage>\n'
            "<query>\nfox<|im_end|>\n</query><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert um.tok.decode(ids) == want
    assert [ids[p] for p in doc_pos] == [um.tok.token_id("<|endoftext|>")] * 2
    assert ids[query_pos] == um.tok.token_id("<|im_end|>")
    assert um.tok.decode(ids[:doc_pos[0]]).endswith("a red fox") and um.tok.decode(ids[:query_pos]).endswith("fox")


def test_the_bare_frame_is_the_user_prompt_alone_and_texts_are_cut_and_cleaned(task, tmp_path):
    cfg, um = build(tmp_path, task, data={"max_doc_len": 3})
    ids, doc_pos, _ = um.list_tokens.sequence("fox<|im_end|>", ["one two three four five six<|endoftext|>"])
    text = um.tok.decode(ids)
    assert text.startswith("I will provide you with 1 passages") and text.endswith("<|im_end|>\n</query>")
    assert text.count("<|im_end|>") == 1 and text.count("<|endoftext|>") == 1  # marker strings removed first
    cut = um.tok.decode(um.tok.encode_ids(["one two three four five six"], 3, add_special_tokens=False)[0])
    assert um.tok.decode(ids[:doc_pos[0]]).endswith('<passage id="0">\n' + cut)


# --------------------------------------------------------------------------------------------- the score
def test_the_score_is_the_cosine_of_the_projected_marker_states_over_the_temperature(task, tmp_path):
    cfg, um = build(tmp_path, task)
    queries, doc_lists = lists_of(task, 1)
    ids, doc_pos, query_pos = um.list_tokens.sequence(queries[0], doc_lists[0])
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    with torch.no_grad():
        hidden = um.run_base("rerank", batch)[0].hidden[0]
        w1, w2 = um.head[0].weight, um.head[2].weight
        proj = lambda h: w2 @ torch.relu(w1 @ h)  # noqa: E731  hidden -> hidden/2 -> jina_proj_dim, no biases
        q = proj(hidden[query_pos])
        want = torch.stack([q @ proj(hidden[p]) / (q.norm() * proj(hidden[p]).norm()) for p in doc_pos])
        got = um(lists=um.list_tokens(queries, doc_lists))["scores"]
    assert w1.shape == (16, 32) and w2.shape == (cfg.train.jina_proj_dim, 16)
    torch.testing.assert_close(got, want / cfg.train.jina_temperature, atol=1e-5, rtol=1e-5)


def test_scores_do_not_depend_on_the_padding_side_and_equal_each_list_scored_alone(task, tmp_path):
    queries, doc_lists = lists_of(task)
    _, left = build(tmp_path, task, "left")
    _, right = build(tmp_path, task, "right")
    with torch.no_grad():
        bl, br = left.list_tokens(queries, doc_lists), right.list_tokens(queries, doc_lists)
        assert bool((bl["attention_mask"] == 0).any())  # the lists differ in length: there is padding
        got_left, got_right = left(lists=bl)["scores"], right(lists=br)["scores"]
        alone = torch.cat([left(lists=left.list_tokens([q], [d]))["scores"] for q, d in zip(queries, doc_lists)])
    assert got_left.shape == (9,)
    torch.testing.assert_close(got_left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_right, alone, atol=1e-5, rtol=0)
    assert float(alone.std()) > 1e-3  # the scores differ between documents (a constant would pass trivially)


def test_the_scores_depend_on_the_other_documents_of_the_list(task, tmp_path):
    # "Last but not late": a document's state has attended to the documents before it.
    _, um = build(tmp_path, task)
    queries, doc_lists = lists_of(task, 1)
    with torch.no_grad():
        full = um(lists=um.list_tokens(queries, doc_lists))["scores"]
        swapped = um(lists=um.list_tokens(queries, [[doc_lists[0][1], doc_lists[0][0]] + doc_lists[0][2:]]))["scores"]
    assert not torch.allclose(full[2:], swapped[2:], atol=1e-4)


# --------------------------------------------------------------------------------------------- training
def test_the_list_loss_is_the_softmax_ce_of_the_positive_against_its_lists_negatives():
    # One list, cosines (0.5, 0.2, -0.1), tau 0.05 -> logits (10, 4, -2), positive first:
    # CE = -log(e^10 / (e^10 + e^4 + e^-2)) = log(1 + e^-6 + e^-12) = 0.0024818. A second list (0.1, 0.3, 0.2)
    # -> logits (2, 6, 4): CE = log(e^2 + e^6 + e^4) - 2 = 4.1429316. Mean over the lists: 2.0727067.
    cos = torch.tensor([0.5, 0.2, -0.1, 0.1, 0.3, 0.2])
    first = math.log(1 + math.exp(-6) + math.exp(-12))
    second = math.log(math.exp(2) + math.exp(6) + math.exp(4)) - 2
    assert first == pytest.approx(0.0024818, abs=1e-6) and second == pytest.approx(4.1429316, abs=1e-6)
    assert losses.group_ce_loss(cos / 0.05, 3).item() == pytest.approx(2.0727067, abs=1e-5)


def test_training_lists_are_shuffled_per_group_and_scored_back_in_group_order(task, tmp_path):
    cfg, um = build(tmp_path, task)
    queries, docs = tiny_setup.fixed_batch(task, 4, 3)
    texts = {"query": queries, "pos": docs[::4], "neg": [d for i, d in enumerate(docs) if i % 4]}
    inputs = unimoer.batch_inputs(um, texts, ["rerank"])
    orders = [unimoer.prf_order(cfg.train.seed, [q] + docs[i * 4:i * 4 + 4]) for i, q in enumerate(queries)]
    assert any(o[0] != 0 for o in orders)  # the positive is not always first in the sequence
    with torch.no_grad():
        got = um(**inputs)["scores"]
        for i, (q, o) in enumerate(zip(queries, orders)):
            shuffled = um(lists=um.list_tokens([q], [[docs[i * 4 + j] for j in o]]))["scores"]
            want = torch.empty(4)
            want[torch.tensor(o)] = shuffled  # the j-th in the sequence is group document o[j]
            torch.testing.assert_close(got[i * 4:i * 4 + 4], want, atol=1e-5, rtol=0)


def test_gradcache_with_the_jina_head_equals_one_step_on_the_whole_batch(task, tmp_path):
    cfg, um = build(tmp_path, task)
    group = 1 + cfg.data.n_neg
    um.train()
    grads = lambda: {n: p.grad.detach().clone() for n, p in um.named_parameters() if p.grad is not None}  # noqa
    _, whole_log = train.forward_backward(um, um, tiny_setup.step_chunks(um, task, 0, 4, 1), cfg, group)
    whole = grads()
    um.zero_grad(set_to_none=True)
    _, gc_log = train.forward_backward(um, um, tiny_setup.step_chunks(um, task, 0, 4, 2), cfg, group)
    gc = grads()
    assert {"emb", "rank"} <= set(whole_log) and any(n.startswith("head.") for n in whole)  # the projector trains
    assert gc_log == pytest.approx(whole_log, abs=1e-5)
    for name, g in whole.items():
        torch.testing.assert_close(gc[name], g, atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def jina_run(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("jina_run")
    cfg = tiny_setup.write_config(str(root / "cfg.yaml"), task, str(root / "run"),
                                  train={**JINA, "steps": 2, "eval_every": 2, "save_every": 2, "warmup_steps": 1})
    train.main([cfg])
    return str(root / "run")


def test_the_projector_is_saved_and_loaded_with_the_run(jina_run, task):
    import json
    from safetensors.torch import load_file
    um = unimoer.load_run(jina_run)
    stored = load_file(os.path.join(unimoer.checkpoint_dir(jina_run), "head.safetensors"))
    assert sorted(stored) == ["0.weight", "2.weight"]
    for k, v in um.head.state_dict().items():
        torch.testing.assert_close(v, stored[k], atol=0, rtol=0)
    with open(os.path.join(jina_run, "metrics.jsonl")) as f:
        final = json.loads(f.readlines()[-1])
    assert {"fixed_ndcg@10", "cand_ndcg@10", "rerank_ndcg@10", "e2rank_fixed_ndcg@10"} <= set(final)


# --------------------------------------------------------------------------------------------- evaluation
def test_blocks_are_merged_by_the_official_weighted_query():
    # Two blocks: q_0 = (1, 0) with documents (1, 0), (0, 1) -> cos 1, 0 -> w_0 = max((1 + cos) / 2) = 1;
    # q_1 = (0, 1) with document (1, 1) -> cos 1/sqrt 2 -> w_1 = (1 + 0.7071068) / 2 = 0.8535534.
    # Query = (w_0 q_0 + w_1 q_1) / (w_0 + w_1) ∝ (1, 0.8535534), norm 1.3147446: cosines against the documents
    # 1 / 1.3147446 = 0.7606040, 0.8535534 / 1.3147446 = 0.6492161, 1.8535534 / (1.3147446 sqrt 2) = 0.9968934.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = listwise.merge_blocks(q, d, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(got, torch.tensor([0.7606040, 0.6492161, 0.9968934]), atol=1e-6, rtol=0)
    assert listwise.blocks(5, 2) == [[0, 1], [2, 3], [4]]


def test_score_list_is_the_cosine_in_one_block_and_the_merge_over_blocks(task, tmp_path):
    cfg, um = build(tmp_path, task)
    queries, docs = tiny_setup.fixed_batch(task, 1, 4)
    with torch.no_grad():
        one = um(lists=um.list_tokens(queries, [docs]))["scores"] * cfg.train.jina_temperature
        assert um.score_list(queries[0], docs) == pytest.approx(one.numpy(), abs=1e-5)
        um.cfg.train.jina_block_size = 2  # blocks [0, 1], [2, 3], [4], each its own sequence
        parts = [listwise.projected(um.run_base("rerank", b)[0].hidden, b, um.head)
                 for b in (um.list_tokens(queries, [docs[a:a + 2]]) for a in (0, 2, 4))]
        want = listwise.merge_blocks(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                     torch.tensor([0, 0, 1, 1, 2]))
    assert um.score_list(queries[0], docs) == pytest.approx(want.numpy(), abs=1e-5)
    with pytest.raises(unimoer.EvalError, match="score_list"):
        um.score_pairs(["fox"], docs[:1])


def test_the_fixed_candidates_are_reranked_by_the_listwise_head(task, tmp_path):
    # retrieval.rerank scores each query's list with score_list, the list in its given order.
    import retrieval
    _, um = build(tmp_path, task)
    queries, docs = tiny_setup.fixed_batch(task, 1, 3)
    corpus = {f"d{i}": t for i, t in enumerate(docs)}
    run = {"q": {f"d{i}": 10.0 - i for i in range(4)}}
    got = retrieval.rerank(um, {"q": queries[0]}, corpus, run, k=4, progress=False)
    want = um.score_list(queries[0], docs)
    assert [got["q"][f"d{i}"] for i in range(4)] == pytest.approx(want.tolist(), abs=1e-6)


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override,key", [(["--train.rerank_loss=bce"], "train.rerank_loss"),
                                          (["--train.rerank_loss=ranknet"], "train.rerank_loss"),
                                          (["--data.jina_query_marker=<|endoftext|>"], "data.jina_query_marker"),
                                          (["--train.jina_temperature=0"], "train.jina_temperature"),
                                          (["--train.jina_proj_dim=0"], "train.jina_proj_dim"),
                                          (["--train.jina_block_size=0"], "train.jina_block_size"),
                                          (["--data.jina_doc_marker="], "data.jina_doc_marker")])
def test_an_incompatible_jina_setting_is_one_config_error_naming_the_key(task, tmp_path, override, key):
    path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), train=JINA)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load_config(path, override)


def test_a_marker_that_is_not_one_token_is_an_error_naming_the_key(task, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.jina_doc_marker must be one token"):
        build(tmp_path, task, data={"jina_doc_marker": "passage end"})


def test_the_tiny_jina_config_is_the_tiny_default_with_the_listwise_head():
    cfg = config.load_config(os.path.join(tiny_setup.REPO, "configs", "tiny_jina_v3.yaml"))
    tiny = config.load_config(os.path.join(tiny_setup.REPO, "configs", "tiny.yaml"))
    assert (cfg.train.rerank_head, cfg.train.rerank_loss, cfg.train.jina_temperature) == ("jina_v3", "group", 0.05)
    assert cfg.train.mode == tiny.train.mode and cfg.data.n_neg == tiny.data.n_neg
    assert np.isclose(cfg.train.lr, tiny.train.lr)


def test_dry_run_counts_the_projector_as_the_trainable_head():
    # Qwen3-0.6B: H = 1024 -> 512 -> 256 (the paper's projector), no biases: 1024 * 512 + 512 * 256 = 655360.
    import dryrun
    path = os.path.join(tiny_setup.REPO, "tests", "data", "hf_configs", "Qwen3-0.6B")
    cfg = config.load_config(os.path.join(tiny_setup.REPO, "configs", "qwen3_0.6b.yaml"),
                             [f"--model.path={path}", "--train.rerank_head=jina_v3", "--train.rerank_loss=group"])
    c = dryrun.dry_run(cfg, gpus=8)["counts"]
    assert c["head"] == 1024 * 512 + 512 * 256 == 655360
    assert c["trainable"] == c["experts"] + c["routers"] + c["head"]
