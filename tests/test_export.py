"""export.py: the exported directories, read by independent libraries, give the unmerged model's vectors and scores.

References: transformers' AutoModel / AutoModelForCausalLM and AutoTokenizer, and sentence-transformers'
SentenceTransformer, on the exported directory alone (local files, no download). The model: a tiny random base
with hard_switch_shared experts (a task router: embed or rerank expert, plus an always-on shared one), every
expert given a non-zero B, so a merge that dropped or mixed up an expert would change the outputs.
"""
import json
import os

import numpy as np
import pytest
import torch

import config
import export
import model as model_mod
import moe_lora
import tiny_setup
import train
import unimoer

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

QUERIES = ["tova-mi lake", "a b c d e f", "x"]
DOCS = ["the lake holds tova-ku and more filler words here", "short", "one two three four five six seven eight"]
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("export") / "synthetic"))


def build(task, root, **over):
    """A UniMoER on the tiny base with random non-zero experts; `over`: config sections merged on top."""
    cfg_path = tiny_setup.write_config(str(root / "cfg.yaml"), task, str(root / "run"), **over)
    um = unimoer.build_model(train.prepare(config.load_config(cfg_path), 0), torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1, std=0.2)
    return um.eval()


@pytest.fixture(scope="module")
def hard_switch(task, tmp_path_factory):
    return build(task, tmp_path_factory.mktemp("hs"), train={"mode": "hard_switch_shared"})


@pytest.fixture(scope="module")
def embed_dir(hard_switch, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "embed")
    export.export(hard_switch, "embed", out)
    return out


@pytest.fixture(scope="module")
def rerank_dir(hard_switch, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "rerank")
    export.export(hard_switch, "rerank", out)
    return out


def hf_embed(path, texts):
    """transformers alone: AutoTokenizer (its post-processor appends the EOS), left padding, AutoModel, the last
    token's hidden state, L2-normalised."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    m = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert tok.padding_side == "left"
    with torch.no_grad():
        h = m(**batch).last_hidden_state  # (B, T, H)
    return torch.nn.functional.normalize(h[:, -1], dim=-1).numpy()  # left padding: the last column is real


# --------------------------------------------------------------------------------------------- embedding
def test_the_experts_change_the_embeddings_so_the_round_trip_can_fail(hard_switch):
    # Without this the parity tests below could pass with the experts dropped.
    ids = hard_switch.tokens_documents(DOCS)
    with torch.no_grad():
        on = hard_switch.embed(ids)[0]
        out = hard_switch.base(ids["input_ids"], ids["attention_mask"], adapters=False).hidden
    off = torch.nn.functional.normalize(out[torch.arange(3), model_mod.last_token_positions(ids["attention_mask"])],
                                        dim=-1)
    assert (on - off).abs().max() > 100 * TOL


def test_transformers_automodel_gives_the_unmerged_models_query_and_document_vectors(hard_switch, embed_dir):
    prompt = json.load(open(os.path.join(embed_dir, "config_sentence_transformers.json")))["prompts"]["query"]
    q = hf_embed(embed_dir, [prompt + x for x in QUERIES])
    d = hf_embed(embed_dir, DOCS)
    np.testing.assert_allclose(q, hard_switch.encode_queries(QUERIES), atol=TOL)
    np.testing.assert_allclose(d, hard_switch.encode_documents(DOCS), atol=TOL)


def test_sentence_transformers_gives_the_unmerged_models_vectors_with_the_query_prompt(hard_switch, embed_dir):
    m = st.SentenceTransformer(embed_dir, device="cpu", local_files_only=True)
    q = m.encode(QUERIES, prompt_name="query", convert_to_numpy=True)
    d = m.encode(DOCS, convert_to_numpy=True)
    np.testing.assert_allclose(q, hard_switch.encode_queries(QUERIES), atol=TOL)
    np.testing.assert_allclose(d, hard_switch.encode_documents(DOCS), atol=TOL)


def test_without_append_eos_the_tokenizer_is_copied_and_the_vectors_still_match(task, tmp_path):
    # data.append_eos false pools at the last text token: the exported tokenizer must not append anything.
    um = build(task, tmp_path, train={"mode": "hard_switch"}, data={"append_eos": False})
    out = str(tmp_path / "embed")
    export.export(um, "embed", out)
    with open(um.tok.source, "rb") as a, open(os.path.join(out, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()
    m = st.SentenceTransformer(out, device="cpu", local_files_only=True)
    np.testing.assert_allclose(m.encode(QUERIES, prompt_name="query"), um.encode_queries(QUERIES), atol=TOL)
    np.testing.assert_allclose(m.encode(DOCS), um.encode_documents(DOCS), atol=TOL)


def test_the_query_prompt_is_the_run_instruction_in_the_qwen3_embedding_format(hard_switch, embed_dir):
    cfg = json.load(open(os.path.join(embed_dir, "config_sentence_transformers.json")))
    # config.format_query: "Instruct: {instruction}\nQuery:{query}"; tiny_setup's instruction is "Find it"
    assert cfg["prompts"] == {"query": "Instruct: Find it\nQuery:", "document": ""}
    pooling = json.load(open(os.path.join(embed_dir, "1_Pooling", "config.json")))
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
    assert json.load(open(os.path.join(embed_dir, "sentence_bert_config.json")))["max_seq_length"] == \
        hard_switch.cfg.data.max_doc_len


def test_the_exported_tokenizer_gives_unimoers_token_ids(hard_switch, embed_dir):
    # The appended EOS and the truncation to max_length - 1 text tokens + EOS, from the post-processor alone.
    tok = transformers.AutoTokenizer.from_pretrained(embed_dir)
    n = hard_switch.cfg.data.max_doc_len
    long = " ".join(["filler"] * 200)
    for text in DOCS + [long]:
        ours = hard_switch.tok.encode_ids([text], n, add_eos=True)[0]
        assert tok(text, truncation=True, max_length=n)["input_ids"] == ours


def test_the_exported_embedding_directory_loads_strictly_in_load_pretrained(hard_switch, embed_dir):
    # Strict keys and shapes; its plain forward equals the unmerged model under the embed task's routing.
    m = model_mod.load_pretrained(embed_dir)
    ids = hard_switch.tokens_documents(DOCS)
    with torch.no_grad(), moe_lora.fixed_routing(hard_switch.base, "embed"):
        want = hard_switch.base(ids["input_ids"], ids["attention_mask"]).hidden
    got = m(ids["input_ids"], ids["attention_mask"]).hidden
    real = ids["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=TOL, rtol=0)


def test_export_leaves_the_model_unmerged(hard_switch, embed_dir):
    assert all(lin.merged_gate is None for lin in hard_switch.base.modules()
               if isinstance(lin, moe_lora.MoELoRALinear))


# --------------------------------------------------------------------------------------------- reranker
def template_scores(path, queries, docs):
    """AutoModelForCausalLM + reranker_template.json alone: prefix ids + pair ids (truncated) + suffix ids,
    left-padded, logit(yes) - logit(no) at the last position."""
    t = json.load(open(os.path.join(path, export.TEMPLATE_FILE)))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    m = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    room = t["max_length"] - len(t["prefix_ids"]) - len(t["suffix_ids"])
    seqs = []
    for q, d in zip(queries, docs):
        text = t["pair_format"].format(instruction=t["instruction"], query=q, document=d)
        seqs.append(t["prefix_ids"] + tok(text, add_special_tokens=False)["input_ids"][:room] + t["suffix_ids"])
    batch = tok.pad({"input_ids": seqs}, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = m(**batch).logits[:, -1]  # (B, V)
    return (logits[:, t["yes_id"]] - logits[:, t["no_id"]]).numpy()


@pytest.mark.parametrize("prompt", ["qwen3", "bare"])
def test_transformers_causal_lm_with_the_template_gives_the_unmerged_models_scores(task, tmp_path, prompt):
    um = build(task, tmp_path, train={"mode": "hard_switch_shared"}, data={"rerank_prompt": prompt})
    out = str(tmp_path / "rerank")
    export.export(um, "rerank", out)
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["Qwen3ForCausalLM"]
    queries, docs = QUERIES + [QUERIES[0]], DOCS + [" ".join(["filler"] * 200)]  # the last pair is truncated
    np.testing.assert_allclose(template_scores(out, queries, docs), um.score_pairs(queries, docs), atol=TOL)


def test_the_reranker_template_json_names_the_qwen3_reranker_frame(rerank_dir):
    t = json.load(open(os.path.join(rerank_dir, export.TEMPLATE_FILE)))
    assert t["pair_format"] == "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    assert t["prefix"].startswith("<|im_start|>system\nJudge whether the Document")
    assert t["suffix"] == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_the_exported_reranker_loads_strictly_in_load_pretrained(rerank_dir):
    m = model_mod.load_pretrained(rerank_dir)
    assert m.config.model_type == "qwen3"


# --------------------------------------------------------------------------------------------- refusals
def test_a_learned_router_is_refused_naming_router_kind(task, tmp_path):
    um = build(task, tmp_path, train={"mode": "joint_moe"})
    with pytest.raises(export.ExportError, match=r"router.kind 'learned' \(train.mode 'joint_moe'\)"):
        export.export(um, "embed", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # refused before anything is written


def test_a_linear_rerank_head_is_refused_naming_the_key(task, tmp_path):
    um = build(task, tmp_path, train={"mode": "hard_switch", "rerank_head": "linear"})
    with pytest.raises(export.ExportError, match="train.rerank_head 'linear'"):
        export.export(um, "rerank", str(tmp_path / "out"))


def test_a_quantised_base_is_refused_naming_model_quant(task, tmp_path):
    um = build(task, tmp_path, train={"mode": "hard_switch"}, model={"quant": "int8"})
    with pytest.raises(export.ExportError, match="model.quant 'int8'"):
        export.export(um, "embed", str(tmp_path / "out"))


def test_a_task_the_mode_does_not_train_is_refused(task, tmp_path):
    um = build(task, tmp_path, train={"mode": "emb_only"})
    with pytest.raises(export.ExportError, match="train.mode 'emb_only' trains"):
        export.export(um, "rerank", str(tmp_path / "out"))


def test_a_non_empty_output_directory_is_refused(hard_switch, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(export.ExportError, match="out: exists and is not an empty directory"):
        export.export(hard_switch, "embed", str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


# --------------------------------------------------------------------------------------------- the CLI
def short_run(task, root, mode):
    """A finished 2-step tiny run of `mode` in <root>/run."""
    cfg = tiny_setup.write_config(str(root / "cfg.yaml"), task, str(root / "run"),
                                  train={"mode": mode, "steps": 2, "eval_every": 2, "save_every": 2,
                                         "warmup_steps": 1})
    train.main([cfg])
    return str(root / "run")


def test_the_cli_exports_a_trained_run_that_sentence_transformers_reads(task, tmp_path):
    run = short_run(task, tmp_path, "hard_switch_shared")
    out = str(tmp_path / "embed")
    assert model_mod.run_cli("export.py", export.main, [run, out, "--task", "embed"]) == 0
    um = unimoer.load_run(run)
    m = st.SentenceTransformer(out, device="cpu", local_files_only=True)
    np.testing.assert_allclose(m.encode(DOCS), um.encode_documents(DOCS), atol=TOL)


def test_the_cli_answers_a_learned_router_with_one_line_naming_router_kind(task, tmp_path, capsys):
    run = short_run(task, tmp_path, "joint_moe")
    capsys.readouterr()  # the training's progress lines
    assert model_mod.run_cli("export.py", export.main, [run, str(tmp_path / "out"), "--task", "rerank"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export.py: error: router.kind 'learned'") and "\n" not in err
