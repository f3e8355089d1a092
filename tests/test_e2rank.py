"""E2Rank (Liu et al. 2025, arXiv 2510.22733; official code Alibaba-NLP/E2Rank): listwise reranking by the embedding
path. train.rerank_head e2rank scores (query, doc) by cos(embed(PRF query), embed(doc)) / e2rank_temperature and
trains it with RankNet; retrieval.e2rank_rerank is the same reranker from any encoder, reported by evaluate.py.

References: RankNet against hand-computed pair lists; the PRF prompt against src/eval.py's template written out;
the score against embeddings computed here from the base's hidden states; the baseline's ranking against cosines
worked out by hand; GradCache against one step on the whole batch.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
import evaluate as ev
import ir
import losses
import moe_lora
import retrieval
import tiny_setup
import train
import unimoer
from model import ConfigError

E2RANK = {"rerank_head": "e2rank", "rerank_loss": "ranknet"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("e2rank") / "synthetic"))


def build(tmp_path, task, **sections):
    """A tiny e2rank model (hard_switch unless a mode is given: the PRF query and the documents then take
    different experts, so routing mistakes show), every expert's B random so the adapters act."""
    sections["train"] = {"mode": "hard_switch", **E2RANK, **sections.get("train", {})}
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), **sections)
    cfg = train.prepare(config.load_config(cfg_path), 0)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    return cfg, um


def texts_of(task, n: int, n_neg: int = 3) -> dict:
    queries, docs = tiny_setup.fixed_batch(task, n, n_neg)
    g = 1 + n_neg
    return {"query": queries, "pos": docs[::g], "neg": [d for i, d in enumerate(docs) if i % g]}


# --------------------------------------------------------------------------------------------- RankNet
def test_ranknet_loss_is_the_mean_softplus_over_the_correctly_ordered_pairs_of_each_list():
    # List 1: labels (2, 0, 1), scores (2.0, 0.5, 1.0): pairs i above j are (0,1) (0,2) (2,1) with s_i - s_j =
    # 1.5, 1.0, 0.5 -> log(1 + e^-x) = 0.2014132780, 0.3132616875, 0.4740769842.
    # List 2: labels (1, 0, 0), scores (0, 1, 3): pairs (0,1) (0,2), s_i - s_j = -1, -3 -> 1.3132616875,
    # 3.0485873516; the tie (1,2) is not a pair. Mean over the batch's 5 pairs: 5.3506010 / 5 = 1.0701202.
    scores = torch.tensor([[2.0, 0.5, 1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([[2.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert losses.ranknet_loss(scores, labels).item() == pytest.approx(1.0701202, abs=1e-6)
    assert losses.ranknet_loss(scores[:1], labels[:1]).item() == pytest.approx(0.3295840, abs=1e-6)


def test_ranknet_on_training_groups_pairs_the_positive_with_each_negative():
    # Groups of 3, positive first: (3, 1, 2) -> pairs (pos, neg) with s diffs 2, 1; (0, 0, 1) -> 0, -1.
    # Mean of log(1 + e^-x) over x = 2, 1, 0, -1: (0.1269280, 0.3132617, 0.6931472, 1.3132617) / 4 = 0.6116496.
    got = losses.ranknet_group_loss(torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 1.0]), 3)
    assert got.item() == pytest.approx(0.6116496, abs=1e-6)


def test_total_loss_with_ranknet_is_infonce_plus_rank_weight_times_ranknet(task, tmp_path):
    # E2Rank's L = L_InfoNCE + lambda L_RankNet with lambda = train.rank_weight.
    cfg, _ = build(tmp_path, task, train={"rank_weight": 2.0})
    q, d = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(8, 8), dim=-1)
    scores = torch.randn(8)
    loss, logged = losses.total_loss({"q": q, "d": d, "scores": scores, "aux": {}}, cfg, 4)
    emb = losses.info_nce_loss(q, d, cfg.train.temperature, False)
    assert loss.item() == pytest.approx(emb.item() + 2.0 * losses.ranknet_group_loss(scores, 4).item(), abs=1e-6)
    assert logged["rank"] == pytest.approx(losses.ranknet_group_loss(scores, 4).item(), abs=1e-6)


# --------------------------------------------------------------------------------------------- the PRF query
def test_the_prf_query_text_is_e2ranks_listwise_prompt():
    # src/eval.py EvalModel.listwise_prompt_template with its "[i] doc" list, written out.
    got = config.format_prf_query("red fox", ["a den", "a hill"], "Rerank these")
    assert got == "Rerank these:\nDocuments:\n[1] a den\n[2] a hill\nSearch Query: red fox"
    assert config.E2RANK_INSTRUCTION == ("Given a web search query and some relevant documents, rerank the "
                                         "documents that answer the query")


def test_prf_tokens_cut_each_document_to_max_doc_len_and_end_with_the_query(task, tmp_path):
    cfg, um = build(tmp_path, task, data={"max_doc_len": 4, "rerank_prompt": "bare"})
    tok = um.tok
    long_doc = "tovami rukeso " * 20
    got = um.tokens_prf(["find ruke"], [[long_doc, "short"]])
    first4 = tok.decode(tok.encode_ids([long_doc], 4, add_special_tokens=False)[0])
    want = tok.encode_ids([config.format_prf_query("find ruke", [first4, "short"], cfg.data.prf_instruction)],
                          10**9, add_special_tokens=False)[0] + [tok.eos_id]  # bare frame: the prompt + EOS
    assert got["input_ids"][0].tolist() == want
    assert len(first4) < len(long_doc)


def test_bare_prf_tokens_end_without_eos_when_append_eos_is_off(task, tmp_path):
    # An embedding like the queries and documents: data.append_eos false pools at the last text token (SmolLM2).
    cfg, um = build(tmp_path, task, data={"rerank_prompt": "bare", "append_eos": False})
    got = um.tokens_prf(["q"], [["d"]])["input_ids"][0].tolist()
    assert got == um.tok.encode_ids([config.format_prf_query("q", ["d"], cfg.data.prf_instruction)], 10**9,
                                    add_special_tokens=False)[0]


def test_prf_tokens_in_the_qwen3_frame_are_the_chat_user_turn(task, tmp_path):
    # Qwen3's chat template, user turn + generation prompt with enable_thinking=False, as src/eval.py applies it.
    cfg, um = build(tmp_path, task, data={"rerank_prompt": "qwen3", "max_pair_len": 400})
    ids = lambda s: um.tok.encode_ids([s], 10**9, add_special_tokens=False)[0]  # noqa: E731
    got = um.tokens_prf(["q"], [["d"]])["input_ids"][0].tolist()
    want = ids("<|im_start|>user\n") + ids(config.format_prf_query("q", ["d"], cfg.data.prf_instruction)) + \
        ids("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert got == want


def test_the_training_prf_order_is_a_seeded_shuffle_so_the_positive_is_not_always_first():
    groups = [[f"q{i}", f"pos{i}", f"n{i}a", f"n{i}b", f"n{i}c"] for i in range(40)]
    orders = [unimoer.prf_order(0, g) for g in groups]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)  # a permutation of the group's 4 documents
    where_pos = [o.index(0) for o in orders]
    assert set(where_pos) == {0, 1, 2, 3}  # the positive lands in every slot
    assert orders == [unimoer.prf_order(0, g) for g in groups]  # a pure function of seed and texts
    assert orders != [unimoer.prf_order(1, g) for g in groups]


def test_batch_inputs_build_each_prf_query_from_its_group_in_prf_order(task, tmp_path):
    cfg, um = build(tmp_path, task)
    texts = texts_of(task, 2)
    inputs = unimoer.batch_inputs(um, texts, ["rerank"])
    assert set(inputs) == {"docs", "prf"}  # a rerank-only step embeds its documents, no pairs
    groups = [[texts["pos"][i]] + texts["neg"][3 * i:3 * i + 3] for i in range(2)]
    orders = [unimoer.prf_order(cfg.train.seed, [q] + g) for q, g in zip(texts["query"], groups)]
    want = um.tokens_prf(texts["query"], [[g[j] for j in o] for g, o in zip(groups, orders)])
    assert torch.equal(inputs["prf"]["input_ids"], want["input_ids"])
    assert torch.equal(inputs["docs"]["input_ids"], um.tokens_documents([x for g in groups for x in g])["input_ids"])


# --------------------------------------------------------------------------------------------- the score
def pooled(um, batch, task_name):
    """Last-real-token hidden state of the base run with `task_name`'s task id (its routing), computed here."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    task_ids = torch.full((ids.shape[0],), config.TASKS.index(task_name))
    hidden = um.base(ids, mask, causal=True, task_ids=task_ids).hidden  # (B, T, H)
    last = (mask * torch.arange(mask.shape[1])).argmax(1)  # the last position with mask 1 (either padding side)
    return hidden[torch.arange(ids.shape[0]), last]


def test_the_e2rank_score_is_the_cosine_of_the_prf_and_document_embeddings_over_the_temperature(task, tmp_path):
    cfg, um = build(tmp_path, task, train={"e2rank_temperature": 0.2})
    um.eval()
    inputs = unimoer.batch_inputs(um, texts_of(task, 2), ["embed", "rerank"])
    with torch.no_grad():
        out = um(**inputs)
        prf = pooled(um, inputs["prf"], "rerank")  # (2, H): the PRF query under the rerank routing
        docs = pooled(um, inputs["docs"], "embed").view(2, 4, -1)  # (2, 4, H): documents under the embed routing
    want = F.cosine_similarity(prf[:, None, :], docs, dim=-1) / 0.2  # (2, 4)
    torch.testing.assert_close(out["scores"].view(2, 4), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["d"].view(2, 4, -1), F.normalize(docs, dim=-1), atol=1e-6, rtol=1e-6)


def test_score_list_is_the_cosine_against_the_prf_query_of_the_lists_top_k(task, tmp_path):
    cfg, um = build(tmp_path, task, train={"e2rank_prf_k": 2})
    docs = texts_of(task, 1)["neg"] + texts_of(task, 1)["pos"]
    with torch.no_grad():
        prf = F.normalize(pooled(um.eval(), um.tokens_prf(["find it"], [docs[:2]]), "rerank"), dim=-1)[0]
        d = F.normalize(pooled(um, um.tokens_documents(docs), "embed"), dim=-1)
    np.testing.assert_allclose(um.score_list("find it", docs), (d @ prf).numpy(), atol=1e-5)
    assert um.listwise
    with pytest.raises(ir.EvalError, match="score_list"):
        um.score_pairs(["find it"], docs[:1])


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def e2rank_run(task, tmp_path_factory):
    """A finished 2-step joint_single e2rank run (the E2Rank setting of one model)."""
    root = tmp_path_factory.mktemp("e2rank_run")
    cfg = tiny_setup.write_config(str(root / "cfg.yaml"), task, str(root / "run"),
                                  train={"mode": "joint_single", **E2RANK, "rank_weight": 2.0, "steps": 2,
                                         "eval_every": 2, "save_every": 2, "warmup_steps": 1})
    train.main([cfg])
    return str(root / "run")


def test_a_training_run_with_the_e2rank_head_logs_both_losses_and_trains_the_expert(e2rank_run):
    import json
    with open(os.path.join(e2rank_run, "train_log.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    assert all({"emb", "rank"} <= set(r) and not r["skipped"] for r in rows)
    um = unimoer.load_run(e2rank_run)
    moved = [m.lora_B for m in um.base.modules() if isinstance(m, moe_lora.MoELoRALinear)]
    assert any(bool(b.abs().max() > 0) for b in moved)  # B starts at zero: the step changed the expert


def test_a_rerank_only_step_also_trains_the_embed_expert_that_embeds_its_documents(task, tmp_path):
    # hard_switch: the PRF query takes the rerank expert, the documents the embed expert, so both are reached.
    cfg, um = build(tmp_path, task)
    assert train.untrained_experts(um, ["rerank"], []) == []
    cfg_path = tiny_setup.write_config(str(tmp_path / "cfg2.yaml"), task, str(tmp_path / "run2"),
                                       train={"mode": "hard_switch", **E2RANK, "stages": [{"steps": 1, "tasks":
                                                                                            "rerank"}],
                                              "eval_every": 1, "save_every": 1, "warmup_steps": 0})
    train.main([cfg_path])
    um = unimoer.load_run(str(tmp_path / "run2"))
    for name in ("embed", "rerank"):
        bs = [m.lora_B[:, m.expert_slice(name)] for m in um.base.modules() if isinstance(m, moe_lora.MoELoRALinear)]
        assert any(bool(b.abs().max() > 0) for b in bs), name


def test_gradcache_with_the_e2rank_head_equals_one_step_on_the_whole_batch(task, tmp_path):
    # Each chunk's scores are its own groups' (PRF query against its own documents), so 2 chunks must give the
    # whole batch's loss and gradients.
    cfg, um = build(tmp_path, task)
    group = 1 + cfg.data.n_neg
    um.train()
    grads = lambda: {n: p.grad.detach().clone() for n, p in um.named_parameters() if p.grad is not None}  # noqa
    _, whole_log = train.forward_backward(um, um, tiny_setup.step_chunks(um, task, 0, 4, 1), cfg, group)
    whole = grads()
    um.zero_grad(set_to_none=True)
    _, gc_log = train.forward_backward(um, um, tiny_setup.step_chunks(um, task, 0, 4, 2), cfg, group)
    gc = grads()
    assert {"emb", "rank"} <= set(whole_log)
    assert gc_log == pytest.approx(whole_log, abs=1e-5)
    assert any(float(g.abs().max()) > 1e-3 for g in whole.values())
    for name, g in whole.items():
        torch.testing.assert_close(gc[name], g, atol=1e-5, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------- evaluation
class FakeEncoder:
    """Fixed unit vectors per text: encode_documents looks each text up (the PRF prompt text included)."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode_documents(self, texts, batch_size):
        return np.stack([np.asarray(self.vectors[t], dtype=np.float32) for t in texts])


def test_the_e2rank_baseline_ranks_the_top_k_by_the_hand_computed_cosine():
    # PRF query from the top k_prf = 2 candidates (a, b) -> e = (1, 0); documents a = (0, 1), b = (.6, .8),
    # c = (.8, .6): cosines 0, .6, .8, so the top 3 become c, b, a; d (below k = 3) stays under them at 0 - 1.
    prompt = config.format_prf_query("fox", ["text a", "text b"])
    enc = FakeEncoder({prompt: [1.0, 0.0], "text a": [0.0, 1.0], "text b": [0.6, 0.8], "text c": [0.8, 0.6],
                       "text d": [1.0, 0.0]})
    corpus = {x: f"text {x}" for x in "abcd"}
    run = {"q": {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}}
    got = retrieval.e2rank_rerank(enc, {"q": "fox"}, corpus, run, k=3, k_prf=2, progress=False)
    assert ir.rank_documents(got["q"]) == ["c", "b", "a", "d"]
    assert got["q"] == pytest.approx({"c": 0.8, "b": 0.6, "a": 0.0, "d": -1.0}, abs=1e-6)


def test_the_e2rank_baseline_uses_the_encoders_own_prf_encoding_where_it_has_one():
    class WithPrf(FakeEncoder):
        def encode_prf(self, queries, doc_lists, batch_size):
            assert (queries, doc_lists) == (["fox"], [["text a"]])  # k_prf = 1
            return np.array([[0.0, 1.0]], dtype=np.float32)

    enc = WithPrf({"text a": [1.0, 0.0], "text b": [0.0, 1.0]})
    got = retrieval.e2rank_rerank(enc, {"q": "fox"}, {"a": "text a", "b": "text b"}, {"q": {"a": 2.0, "b": 1.0}},
                                  k=2, k_prf=1, progress=False)
    assert ir.rank_documents(got["q"]) == ["b", "a"]


def test_an_e2rank_run_reports_its_reranking_through_the_e2rank_scorer(e2rank_run, task, tmp_path):
    # The reranking path of an e2rank head IS E2Rank: the dev fixed_* figure is E2Rank's, and evaluate.py's
    # rerank / two_stage stages equal its E2Rank baseline stages on the same lists.
    import json
    with open(os.path.join(e2rank_run, "metrics.jsonl")) as f:
        final = json.loads(f.readlines()[-1])
    assert final["fixed_ndcg@10"] == final["e2rank_fixed_ndcg@10"]
    cands = os.path.join(e2rank_run, ev.DEV_CANDIDATES)
    res = ev.evaluate_checkpoint(e2rank_run, task, "dev", k_rerank=5, candidates=cands, out_dir=str(tmp_path / "e"),
                                 progress=False)
    assert res["e2rank"] == res["rerank"] and res["e2rank_two_stage"] == res["two_stage"]
    assert {"run.e2rank.trec", "run.e2rank_two_stage.trec"} <= set(os.listdir(tmp_path / "e"))
    off = ev.evaluate_checkpoint(e2rank_run, task, "dev", k_rerank=5, e2rank=False, write=False, progress=False)
    assert "e2rank_two_stage" not in off and off["two_stage"] == res["two_stage"]


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override,key", [(["--train.rerank_loss=group"], "train.rerank_loss"),
                                          (["--model.bidirectional=true"], "model.bidirectional"),
                                          (["--train.e2rank_temperature=0"], "train.e2rank_temperature"),
                                          (["--train.e2rank_prf_k=0"], "train.e2rank_prf_k")])
def test_an_incompatible_e2rank_setting_is_one_config_error_naming_the_key(task, tmp_path, override, key):
    path = tiny_setup.write_config(str(tmp_path / "cfg.yaml"), task, str(tmp_path / "run"), train=E2RANK)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load_config(path, override)


def test_the_tiny_e2rank_config_is_e2ranks_setting_of_one_model():
    cfg = config.load_config(os.path.join(tiny_setup.REPO, "configs", "tiny_e2rank.yaml"))
    t = cfg.train
    assert (t.mode, t.rerank_head, t.rerank_loss, t.rank_weight, t.emb_weight) == \
        ("joint_single", "e2rank", "ranknet", 2.0, 1.0)
    assert math.isclose(t.e2rank_temperature, 0.1)  # official ranknet_scale_factor 10
