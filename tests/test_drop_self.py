"""The self-hit rule as a switch: ir.resolve_drop_self ("auto" | "on" | "off"), evaluate_checkpoint and
the CLI's --drop-self (recorded in metrics.json), and training's dev evaluation (always "auto").

auto drops a retrieved document whose id equals the query id only where the queries are corpus documents
(ArguAna, Quora, CQADupStack); on collections whose query and document ids are unrelated numbers (Cranfield,
MS MARCO) it keeps them, because there a document "1" is not query "1".
"""
import json
import os
import shutil

import pytest

import data
import evaluate
import evaluate as ev
import ir
import tiny_setup
import unimoer


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


# --------------------------------------------------------------------------------------------- the rule
def test_auto_drops_where_the_query_is_its_document_arguana_style():
    # ArguAna: the query is the argument's text; the corpus document is title + " " + that text, same id.
    queries = {"test-env-pro02b": "Being vegetarian  reduces risks"}
    corpus = {"test-env-pro02b": "Vegetarianism Being vegetarian reduces risks", "other": "meat"}
    assert ir.resolve_drop_self("auto", queries, corpus) is True


def test_auto_drops_on_quora_although_its_ids_are_numbers():
    queries = {"1": "How do I learn Python?"}
    corpus = {"1": "How do I learn Python?", "2": "What is Java?"}
    assert ir.resolve_drop_self("auto", queries, corpus) is True


def test_auto_drops_where_the_query_is_its_document_title_cqadupstack_style():
    queries = {"123": "Merge two dicts"}
    corpus = {"123": "Merge two dicts How can I merge two dictionaries in one expression?"}
    assert ir.resolve_drop_self("auto", queries, corpus) is True


def test_auto_keeps_documents_whose_numeric_id_merely_equals_a_query_id_cranfield_style():
    queries = {"1": "what similarity laws must be obeyed", "2": "what are the structural loads"}
    corpus = {"1": "experimental investigation of the aerodynamics of a wing", "2": "simple shear flow past a plate"}
    assert ir.resolve_drop_self("auto", queries, corpus) is False


def test_auto_keeps_everything_when_no_query_id_is_a_document_id():
    assert ir.resolve_drop_self("auto", {"q1": "a b"}, {"d1": "a b"}) is False


def test_an_empty_query_matches_no_document():
    assert ir.resolve_drop_self("auto", {"1": "  "}, {"1": "anything"}) is False


@pytest.mark.parametrize("mode,expected", [("on", True), ("off", False)])
def test_on_and_off_ignore_the_data(mode, expected):
    assert ir.resolve_drop_self(mode, {"1": "x"}, {"1": "y"}) is expected
    assert ir.resolve_drop_self(mode, {"1": "x"}, {"1": "x"}) is expected


def test_an_unknown_mode_is_an_error():
    with pytest.raises(ir.EvalError, match="drop_self must be one of auto, on, off, got 'yes'"):
        ir.resolve_drop_self("yes", {}, {})


# --------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(task, a 2-step tiny run, a copy of the task whose first test query is also a corpus document)."""
    root = tmp_path_factory.mktemp("drop_self")
    task = tiny_setup.write_synthetic(str(root / "synthetic"))
    cfg, _ = tiny_setup.finished_run(str(root), task)
    selfish = str(root / "selfish")
    shutil.copytree(task, selfish)
    qid = sorted(ir.judged_queries(data.load_qrels(task, "test")))[0]
    with open(os.path.join(selfish, "corpus.jsonl"), "a") as f:  # the query, as a document under its own id
        f.write(json.dumps({"_id": qid, "title": "", "text": data.load_queries(task)[qid]}) + "\n")
    return task, str(root / "run"), selfish, qid


@pytest.mark.parametrize("mode,dropped", [("auto", True), ("on", True), ("off", False)])
def test_the_switch_reaches_the_retrieval_run_and_metrics_json(run, tmp_path, mode, dropped):
    _, ckpt, selfish, qid = run
    out = tmp_path / "eval"
    n_docs = len(data.load_corpus(selfish))
    assert ev.cli([ckpt, "--data", selfish, "--k-retrieve", str(n_docs), "--k-rerank", "2", "--max-queries", "1",
                   "--out", str(out), "--drop-self", mode, "--device", "cpu"]) == 0
    retrieved = ir.read_trec_run(str(out / "run.retrieval.trec"))[qid]
    assert (qid not in retrieved) is dropped
    assert len(retrieved) == n_docs - dropped  # every document retrieved, the self-hit alone left out
    prov = json.load(open(out / "metrics.json"))["provenance"]
    assert prov["drop_self"] == mode and prov["self_hits_dropped"] is dropped


def test_auto_keeps_everything_on_the_synthetic_task(run, tmp_path):
    task, ckpt, _, _ = run
    res = ev.evaluate_checkpoint(ckpt, task, "test", k_rerank=2, max_queries=2, write=False, progress=False)
    assert res["provenance"]["drop_self"] == "auto" and res["provenance"]["self_hits_dropped"] is False


def test_training_dev_evaluation_drops_self_hits_by_the_auto_rule(run):
    _, ckpt, _, _ = run
    um = unimoer.load_run(ckpt)
    um.cfg.train.rerank_topk = 2
    corpus = {f"d{i}": f"document number {i} about field data" for i in range(10)}
    corpus["x"] = "what is the stage of the group"
    # Query "x" is document "x" (same id, same text): auto drops it, so its only relevant document is gone.
    selfish = evaluate.dev_evaluate(um, (corpus, {"x": corpus["x"]}, {"x": {"x": 1}}), um.cfg)
    # The same query under another id: the document is retrieved (all 11 are within the top 100).
    control = evaluate.dev_evaluate(um, (corpus, {"qx": corpus["x"]}, {"qx": {"x": 1}}), um.cfg)
    assert selfish["emb_recall@100"] == 0.0 and control["emb_recall@100"] == 1.0
