"""rag.py as a spec: retrieve -> rerank -> generate from one base on a tiny trained run and the tiny synthetic task's
QA file: the written files and their fields, the metrics against hand-computed means, the prompt against an
independent retrieve + rerank, one base held (and two / three in the baselines), generation against
generate.generate_text, the synthetic QA set, and clear errors for a bad QA file.

Everything runs on tiny_setup's synthetic task (300 documents, 16 test questions) and a one-layer width-32 base
trained for 2 steps in-process; one pipeline run takes about a second on one thread.
"""
import json
import os
import shutil

import numpy as np
import pytest

import data
import evaluate
import moe_lora
import quant
import rag
import synthetic
import torch
import tiny_setup
import unimoer
from generate import generate_text
from ir import rank_documents

SETTINGS = rag.Settings(k_retrieve=8, k_rerank=4, k_context=2, max_new_tokens=6, max_passage_len=1000,
                        batch_size=16, gen_batch_size=4)  # passages never cut: the prompt holds whole documents


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("rag") / "synthetic"))


@pytest.fixture(scope="module")
def run(task, tmp_path_factory):
    return tiny_setup.finished_run(str(tmp_path_factory.mktemp("rag_run")), task)[1]


@pytest.fixture(scope="module")
def qa_path(task):
    return os.path.join(task, synthetic.QA_FILE)


@pytest.fixture(scope="module")
def models(run):
    return rag.load_models(run)


@pytest.fixture(scope="module")
def unified(models, run, task, qa_path, tmp_path_factory):
    """rag_checkpoint on the one-base models, written: (returned dict, output directory)."""
    out = str(tmp_path_factory.mktemp("rag_out") / "unified")
    return rag.rag_checkpoint(run, task, qa_path, settings=SETTINGS, out_dir=out, models=models, progress=False), out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def corpus_texts(task):
    return {k: data.doc_text(v) for k, v in data.load_corpus(task).items()}


# --------------------------------------------------------------------------------------------- end to end
def test_pipeline_writes_metrics_and_predictions_with_their_fields(unified, qa_path):
    result, out = unified
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("em", "f1", "answer_recall@2", "retrieval_answer_recall@2", "num_questions", "costs", "provenance"):
        assert key in metrics, key
    lat = metrics["costs"]["latency"]
    for key in ("retrieval_s_per_query", "rerank_s_per_query", "generation_s_per_query", "corpus_encode_s"):
        assert lat[key] > 0, key
    assert metrics["costs"]["peak_memory_bytes"] > 0 and metrics["costs"]["params"]["held_bytes"] > 0
    preds = read_jsonl(os.path.join(out, "predictions.jsonl"))
    assert [p["id"] for p in preds] == [ex["id"] for ex in data.load_qa(qa_path)] and len(preds) == 16
    for p in preds:
        assert {"id", "question", "answers", "prediction", "em", "f1", "hit", "context", "prompt"} <= set(p)
        assert len(p["context"]) == SETTINGS.k_context and 1 <= p["new_tokens"] <= SETTINGS.max_new_tokens
    assert metrics == {k: v for k, v in result.items() if k != "predictions"}


def test_metrics_are_the_means_of_the_written_per_question_scores(unified):
    result, out = unified
    preds = read_jsonl(os.path.join(out, "predictions.jsonl"))
    assert result["em"] == pytest.approx(np.mean([p["em"] for p in preds]))
    assert result["f1"] == pytest.approx(np.mean([p["f1"] for p in preds]))
    assert result["answer_recall@2"] == pytest.approx(np.mean([p["hit"] for p in preds]))


def test_cli_writes_the_outputs_and_prints_one_summary_line(run, task, qa_path, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert rag.cli([run, "--data", task, "--qa", qa_path, "--k-retrieve", "6", "--k-rerank", "3", "--k-context",
                    "1", "--max-new-tokens", "3", "--max-questions", "4", "--device", "cpu", "--out", out]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["num_questions"] == 4 and "em" in line and "answer_recall@1" in line
    assert len(read_jsonl(os.path.join(out, "predictions.jsonl"))) == 4
    assert os.path.isfile(os.path.join(out, "metrics.json"))


# --------------------------------------------------------------------------------------------- metrics
def test_em_f1_and_answer_recall_aggregate_to_hand_computed_means():
    records = [
        # "The Eiffel Tower" -> "eiffel tower" = the gold: EM 1, F1 1; the context names no answer
        rag.score_example("The Eiffel Tower", ["Eiffel Tower"], ["a tower in paris"], ["a tower in paris"]),
        # "paris france" vs "paris": common 1, P = 1/2, R = 1, F1 = 2/3 (vs "lyon": 0); the context says "Paris"
        rag.score_example("Paris France", ["Lyon", "Paris"], ["Paris is big."], ["nothing"]),
        # "1912" vs "1913": EM 0, F1 0; the second passage holds "1913"
        rag.score_example("1912", ["1913"], ["no year", "opened in 1913"], ["opened in 1913"]),
    ]
    agg = rag.aggregate(records, k_context=2)
    assert agg["em"] == pytest.approx((1 + 0 + 0) / 3)
    assert agg["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert agg["answer_recall@2"] == pytest.approx((0 + 1 + 1) / 3)
    assert agg["retrieval_answer_recall@2"] == pytest.approx((0 + 0 + 1) / 3)


def test_the_prediction_is_the_first_generated_line_stripped():
    assert rag.answer_text("  tova-ku \nmore text\n") == "tova-ku"


# --------------------------------------------------------------------------------------------- the prompt
def test_prompt_holds_exactly_the_top_k_context_reranked_documents_in_order(unified, models, task):
    """The reference ranks without rag.py, retrieval.py or faiss: cosine scores of encode_queries x
    encode_documents, the top k_retrieve, their first k_rerank rescored by score_pairs and sorted."""
    result, _ = unified
    um, corpus = models.retriever, corpus_texts(task)
    doc_ids = list(corpus)
    preds = result["predictions"]
    q_emb = um.encode_queries([p["question"] for p in preds], 16)  # (n, H)
    d_emb = um.encode_documents([corpus[d] for d in doc_ids], 16)  # (N, H)
    for p, scores in zip(preds, q_emb @ d_emb.T):
        dense = {doc_ids[j]: float(scores[j]) for j in np.argsort(-scores)[:SETTINGS.k_retrieve]}
        head = rank_documents(dense)[:SETTINGS.k_rerank]
        rr = um.score_pairs([p["question"]] * len(head), [corpus[d] for d in head], 8)
        expected = [head[j] for j in np.argsort(-rr, kind="stable")[:SETTINGS.k_context]]
        assert p["context"] == expected
        in_prompt = [d for d in doc_ids if corpus[d] in p["prompt"]]
        assert sorted(in_prompt) == sorted(expected)  # no other document
        positions = [p["prompt"].index(f"Passage {i}: {corpus[d]}\n") for i, d in enumerate(expected, 1)]
        assert positions == sorted(positions) and p["prompt"].endswith(f"Question: {p['question']}\nAnswer:")


def test_passages_are_cut_to_max_passage_len_tokens(models):
    tok = models.gen_tok
    text = "report notes that this record shows our team saw some new old data"
    cut = rag.truncate(tok, text, 3)
    assert tok.encode_ids([cut], 100, add_special_tokens=False)[0] == \
        tok.encode_ids([text], 100, add_special_tokens=False)[0][:3]
    assert rag.truncate(tok, text, 1000) == text


# --------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def noisy(run):
    """The run with large random expert B matrices, so that its experts change the generated tokens."""
    m = rag.load_models(run)
    tiny_setup.randomize_lora_B(m.retriever, seed=0, std=0.5)
    return m


@pytest.mark.parametrize("routing", [None, "embed"])
def test_answers_equal_generate_text_on_the_same_prompts(noisy, routing, task, qa_path):
    """generate_stage's length-sorted batches against generate_text, one prompt at a time (adapters off, or inside
    moe_lora.fixed_routing); the experts-off reference differs from the embed one, so the two cases are told apart."""
    result = rag.rag_checkpoint("unused", task, qa_path, settings=SETTINGS._replace(routing=routing), models=noisy,
                                write=False, max_questions=6, progress=False)
    base, tok = noisy.generator, noisy.gen_tok
    prompts = [p["prompt"] for p in result["predictions"]]
    off = [generate_text(base, tok, [x], SETTINGS.max_new_tokens, 10**9, adapters=False)[0] for x in prompts]
    with moe_lora.fixed_routing(base, "embed"):
        embed = [generate_text(base, tok, [x], SETTINGS.max_new_tokens, 10**9)[0] for x in prompts]
    assert off != embed
    assert [p["generated"] for p in result["predictions"]] == (off if routing is None else embed)


def test_gen_routing_parses_none_task_names_and_mixes():
    assert rag.parse_routing("none") is None and rag.parse_routing("rerank") == "rerank"
    assert rag.parse_routing("embed=0.25,rerank=0.75") == {"embed": 0.25, "rerank": 0.75}
    with pytest.raises(ValueError, match="name=weight"):
        rag.parse_routing("embed=x")


def test_an_unknown_gen_routing_expert_is_one_clear_error(models, task, qa_path):
    with pytest.raises(ValueError, match="gen-routing.*nosuch"):
        rag.rag_checkpoint("unused", task, qa_path, settings=SETTINGS._replace(routing={"nosuch": 1.0}),
                           models=models, write=False)


# --------------------------------------------------------------------------------------------- one base or two
def test_one_base_is_held_without_reranker_or_generator(models, unified):
    assert models.reranker is models.retriever and models.generator is models.retriever.base
    params = unified[0]["costs"]["params"]
    assert params["bases_held"] == 1
    assert params["held_bytes"] == evaluate.param_costs(models.retriever)["unified_bytes"]


@pytest.fixture(scope="module")
def run_copy(run, tmp_path_factory):
    """A second copy of the same run: the two-models baseline with identical weights."""
    dst = str(tmp_path_factory.mktemp("rag_copy") / "run")
    shutil.copytree(run, dst)
    return dst


def test_two_models_mode_loads_a_second_model_and_holds_both(run, run_copy, models):
    two = rag.load_models(run, reranker=run_copy)
    assert two.reranker is not two.retriever and two.reranker.base is not two.retriever.base
    assert two.generator is two.retriever.base
    assert rag.held_param_bytes(two) == 2 * rag.held_param_bytes(models)
    three = rag.load_models(run, reranker=run_copy, generator=run_copy)
    assert three.generator is not three.retriever.base and three.generator is not three.reranker.base


def test_two_copies_of_one_run_give_the_unified_answers(run, run_copy, task, qa_path, unified):
    result = rag.rag_checkpoint(run, task, qa_path, settings=SETTINGS, reranker=run_copy, generator=run_copy,
                                write=False, progress=False)
    assert result["costs"]["params"]["bases_held"] == 3
    assert [(p["context"], p["generated"]) for p in result["predictions"]] == \
        [(p["context"], p["generated"]) for p in unified[0]["predictions"]]


# --------------------------------------------------------------------------------------------- the QA set and bad input
def test_synthetic_answers_are_the_target_concept_the_question_does_not_name(task, qa_path):
    with open(os.path.join(task, "lexicon.json")) as f:
        forms_of = {w: set(forms) for forms in json.load(f)["concepts"] for w in forms}
    qrels, corpus = data.load_qrels(task, "test"), data.load_corpus(task)
    qa = data.load_qa(qa_path)
    assert sorted(ex["id"] for ex in qa) == sorted(qrels)
    for ex in qa:
        (target,) = qrels[ex["id"]]
        doc_words = corpus[target]["text"].split()
        assert ex["answers"][0] in doc_words  # the document's own form first
        assert set(ex["answers"]) == forms_of[ex["answers"][0]]  # then the concept's other forms
        assert not set(ex["question"].split()) & set(ex["answers"])
        named = [w for w in doc_words if w in forms_of and w not in ex["answers"]]
        assert len(named) == 2 and all(forms_of[w] & set(ex["question"].split()) for w in named)


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "question": "q"', "invalid JSON"),
    ('{"id": "b", "question": "q"}', 'missing "answers"'),
    ('{"id": "b", "question": "q", "answers": "x"}', '"answers" must be a non-empty list'),
    ('{"id": "b", "question": "q", "answers": []}', '"answers" must be a non-empty list'),
    ('{"id": "b", "question": " ", "answers": ["x"]}', '"question" must be a non-empty string'),
    ('{"id": "a", "question": "q", "answers": ["x"]}', "duplicate id 'a' \\(first at line 1\\)"),
])
def test_a_malformed_qa_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"id": "a", "question": "q", "answers": ["x"]}\n' + line + "\n")
    with pytest.raises(data.DataError, match=f"{path}:2: {message}"):
        data.load_qa(str(path))


def test_a_missing_qa_file_is_one_clear_cli_error(run, task, tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    assert rag.cli([run, "--data", task, "--qa", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rag.py: error: {missing}: QA file not found")
    assert f"python synthetic.py {task} --qa" in err[0]  # the synthetic task says how to write one


def test_a_malformed_qa_line_stops_the_cli_with_one_line_naming_it(run, task, tmp_path, capsys):
    # the QA file is read before any model loads: one stderr line, exit code 2, nothing written
    path = tmp_path / "qa.jsonl"
    path.write_text('{"id": "a", "question": "q", "answers": ["x"]}\n{"id": "b", "question": "q"}\n')
    out = tmp_path / "out"
    assert rag.cli([run, "--data", task, "--qa", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'rag.py: error: {path}:2: missing "answers"'] and not out.exists()


def test_a_run_deployed_with_int8_keeps_its_experts_over_a_quantised_base(run):
    """evaluate.py / rag.py RUN --model.quant=int8: the trained experts unchanged, the base's projections
    QuantLinear, the vectors close to the fp32 ones (int8 error) but not equal (the base really is quantised)."""
    fp32, _ = unimoer.load_model(run)
    int8, info = unimoer.load_model(run, overrides=["--model.quant=int8"])
    lins = {n: m for n, m in int8.base.named_modules() if isinstance(m, moe_lora.MoELoRALinear)}
    ref = dict(fp32.base.named_modules())
    assert lins and all(isinstance(m.base_linear, quant.QuantLinear) for m in lins.values())
    assert all(torch.equal(m.lora_A, ref[n].lora_A) and torch.equal(m.lora_B, ref[n].lora_B) for n, m in lins.items())
    texts = ["a first text", "another one, longer than the first"]
    a, b = fp32.encode_documents(texts), int8.encode_documents(texts)
    assert 0 < abs(a - b).max() < 0.05
    assert int8.cfg.model.quant == "int8" and info["kind"] == "checkpoint"


def test_the_cost_of_a_quantised_base_counts_its_codes_scales_and_zeros(run):
    """param_costs / held_param_bytes: the int4 base is its float tensors (embeddings, norms) plus, per quantised
    linear, out * ceil(in / 2) code bytes, fp32 scales and uint8 zero points (out, in / group) — written out here."""
    um, _ = unimoer.load_model(run, overrides=["--model.quant=int4", "--model.quant_group=8"])
    lins = [m.base_linear for m in um.base.modules() if isinstance(m, moe_lora.MoELoRALinear)]
    adapters = {id(t) for t in moe_lora.adapter_state_dict(um.base).values()}
    floats = sum(p.numel() * p.element_size() for p in um.base.parameters() if id(p) not in adapters)
    codes = sum(q.out_features * ((q.in_features + 1) // 2 + (4 + 1) * (q.in_features // 8)) for q in lins)
    assert evaluate.param_costs(um)["base_bytes"] == floats + codes
    models = rag.RagModels(um, um, um.base, um.tok, {})
    assert rag.held_param_bytes(models) == evaluate.param_costs(um)["unified_bytes"]
