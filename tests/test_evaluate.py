"""evaluate.py's checkpoint side as a spec: evaluate_checkpoint / the CLI on a tiny trained run, the bare-base and
two-model baselines, rerank-only over a candidate run, output files against pytrec_eval, costs, clear errors,
torchrun sharding, and the MTEB encoder.

Everything runs on tiny_setup's synthetic task (300 documents, 16 dev and 16 test queries) and a one-layer
width-32 random base trained for 4 steps in-process; one evaluation takes well under a second on one thread.
"""
import enum
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import pytrec_eval
import torch
from safetensors.torch import load_file

import config
import data
import evaluate as ev
import ir
import retrieval
import tiny_setup
import train
import unimoer
from model import load_pretrained, load_tokenizer

K_RERANK = 5
STAGE_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("eval") / "synthetic"))


@pytest.fixture(scope="module")
def run(task, tmp_path_factory):
    """A finished 4-step joint_moe run (dev evaluation at steps 0 and 4, reranking depth 5)."""
    root = tmp_path_factory.mktemp("eval_run")
    cfg = tiny_setup.write_config(str(root / "cfg.yaml"), task, str(root / "run"),
                                  train={"steps": 4, "eval_every": 4, "save_every": 4, "rerank_topk": K_RERANK})
    train.main([cfg])
    return str(root / "run")


@pytest.fixture(scope="module")
def evaluated(run, task, tmp_path_factory):
    """evaluate_checkpoint on the test split, written to a directory: (returned dict, output directory)."""
    out = str(tmp_path_factory.mktemp("eval_out") / "test")
    return ev.evaluate_checkpoint(run, task, "test", k_rerank=K_RERANK, out_dir=out, progress=False), out


def judged_test_qrels(task):
    qrels = data.load_qrels(task, "test")
    return {q: qrels[q] for q in ir.judged_queries(qrels)}


def bare_base(path):
    """The plain base as evaluate.py's baseline must serve it: no experts, config.Config() defaults."""
    cfg = config.Config()
    cfg.model.path = path
    return unimoer.UniMoER(load_pretrained(path), load_tokenizer(path), cfg).eval()


def load_json(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- evaluation
def test_two_stage_evaluation_of_a_tiny_checkpoint_writes_metrics_runs_and_per_query(evaluated, run, task):
    result, out = evaluated
    assert sorted(os.listdir(out)) == ["metrics.json", "per_query.json", "run.e2rank_two_stage.trec",
                                       "run.retrieval.trec", "run.two_stage.trec"]  # + the E2Rank baseline (default)
    metrics = load_json(os.path.join(out, "metrics.json"))
    assert {k: v for k, v in result.items() if k != "per_query"} == metrics
    assert result["per_query"] == load_json(os.path.join(out, "per_query.json"))
    assert metrics["checkpoint"] == os.path.abspath(run) and metrics["dataset"] == "synthetic"
    assert metrics["split"] == "test" and metrics["num_queries"] == len(judged_test_qrels(task)) == 16
    assert metrics["runs"] == {"retrieval": "run.retrieval.trec", "two_stage": "run.two_stage.trec",
                               "e2rank_two_stage": "run.e2rank_two_stage.trec"}
    prov = metrics["provenance"]
    assert prov["k_rerank"] == K_RERANK and prov["k_retrieve"] == 100 and prov["index"] == "flat"
    assert prov["mode"] == "joint_moe" and len(prov["adapters_sha256"]) == 64
    assert prov["query_format"] == "Instruct: Find it\nQuery:{query}" and prov["max_lengths"]["doc"] == 32
    for stage in ("retrieval", "two_stage", "e2rank_two_stage"):
        assert set(metrics[stage]) == set(STAGE_METRICS)
        per_query = result["per_query"][stage].values()
        for name in STAGE_METRICS:  # each mean is the mean of the per-query values
            assert metrics[stage][name] == pytest.approx(np.mean([v[name] for v in per_query]))
    two_stage = ir.read_trec_run(os.path.join(out, "run.two_stage.trec"))
    dense = ir.read_trec_run(os.path.join(out, "run.retrieval.trec"))
    assert all(set(two_stage[q]) == set(dense[q]) and len(dense[q]) == 100 for q in dense)
    assert metrics["two_stage"]["recall@100"] == metrics["retrieval"]["recall@100"]  # the same 100, reordered


def test_run_files_read_back_give_the_metrics_json_figures(evaluated, task):
    result, out = evaluated
    for stage in ("retrieval", "two_stage"):
        again = ir.evaluate_run(judged_test_qrels(task), ir.read_trec_run(os.path.join(out, f"run.{stage}.trec")))
        assert {k: again[k] for k in STAGE_METRICS} == result[stage]
        assert again["per_query"] == result["per_query"][stage]


def test_metrics_json_ndcg_equals_pytrec_eval_over_the_written_run_file(evaluated, task):
    _, out = evaluated
    metrics = load_json(os.path.join(out, "metrics.json"))
    evaluator = pytrec_eval.RelevanceEvaluator(data.load_qrels(task, "test"), {"ndcg_cut_10", "recall_100"})
    for stage in ("retrieval", "two_stage"):
        per_query = evaluator.evaluate(ir.read_trec_run(os.path.join(out, f"run.{stage}.trec")))
        assert len(per_query) == metrics["num_queries"]
        assert metrics[stage]["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in per_query.values()]),
                                                          abs=1e-12)
        assert metrics[stage]["recall@100"] == pytest.approx(np.mean([v["recall_100"] for v in per_query.values()]),
                                                             abs=1e-12)


def test_cli_on_the_tiny_run_reproduces_trainings_final_dev_figures(run):
    res = subprocess.run([sys.executable, os.path.join(tiny_setup.REPO, "evaluate.py"), run], capture_output=True,
                         text=True, timeout=240, env=tiny_setup.SUBPROCESS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 1  # exactly one JSON line on stdout; logs go to stderr
    summary = json.loads(lines[0])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        final = json.loads(f.readlines()[-1])
    assert final["step"] == 4
    assert summary["retrieval"]["ndcg@10"] == final["emb_ndcg@10"]  # exactly, not approximately
    assert summary["retrieval"]["recall@100"] == final["emb_recall@100"]
    assert summary["two_stage"]["ndcg@10"] == final["rerank_ndcg@10"]
    assert summary["two_stage"]["mrr@10"] == final["rerank_mrr@10"]
    metrics = load_json(os.path.join(run, "eval", "synthetic-dev", "metrics.json"))
    assert metrics["split"] == "dev" and metrics["provenance"]["k_rerank"] == K_RERANK
    assert metrics["two_stage"] == summary["two_stage"]


def test_a_plain_model_directory_is_evaluated_as_the_bare_base(run, task, tmp_path):
    base_dir = os.path.join(run, "base")  # config.json + model.safetensors + tokenizer, no adapters
    result = ev.evaluate_checkpoint(base_dir, task, "test", k_rerank=K_RERANK, out_dir=str(tmp_path), progress=False)
    assert result["provenance"]["mode"] == "base (no adapters)" and result["provenance"]["adapters_sha256"] is None
    # config.Config()'s default templates and lengths, not the run's
    assert result["provenance"]["embed_instruction"] == config.EMBED_INSTRUCTION
    assert result["provenance"]["max_lengths"] == {"query": 64, "doc": 128, "pair": 256}
    corpus = {k: data.doc_text(v) for k, v in data.load_corpus(task).items()}
    queries = {q: data.load_queries(task)[q] for q in sorted(judged_test_qrels(task))}  # as load_split orders them
    dense, reranked = retrieval.two_stage(bare_base(base_dir), queries, corpus, k_rerank=K_RERANK, progress=False)
    assert ir.read_trec_run(str(tmp_path / "run.retrieval.trec")) == dense
    assert ir.read_trec_run(str(tmp_path / "run.two_stage.trec")) == reranked


def test_cli_overrides_configure_a_plain_model_directory(run, task, tmp_path, capsys):
    # A bare base whose EOS is a sink token (SmolLM2) is evaluated without it: --data.append_eos=false.
    base_dir = os.path.join(run, "base")
    assert ev.main([base_dir, "--data", task, "--k-rerank", "3", "--max-queries", "4", "--out", str(tmp_path),
                    "--data.append_eos=false", "--data.max_query_len=20"]) == 0
    prov = load_json(str(tmp_path / "metrics.json"))["provenance"]
    assert prov["max_lengths"]["query"] == 20
    um, _ = unimoer.load_model(base_dir, overrides=["--data.append_eos=false"])
    assert um.tokens_documents(["ruke"])["input_ids"][0, -1].item() != um.tok.eos_id


def test_a_non_deployment_override_on_a_run_is_one_clear_error(run):
    """A run is evaluated with what it trained on; only config.DEPLOY_KEYS (how the base is stored) may change."""
    with pytest.raises(config.ConfigError, match="append_eos=false.*only the deployment settings"):
        unimoer.load_model(run, overrides=["--data.append_eos=false"])


def test_an_unknown_override_key_is_one_config_error_naming_it(run):
    with pytest.raises(config.ConfigError, match="append_eoss"):
        unimoer.load_model(os.path.join(run, "base"), overrides=["--data.append_eoss=false"])


def test_reranker_option_reranks_the_first_stage_with_the_second_model(run, task, evaluated, tmp_path):
    base_dir = os.path.join(run, "base")
    result = ev.evaluate_checkpoint(run, task, "test", k_rerank=K_RERANK, reranker=base_dir, out_dir=str(tmp_path),
                                    progress=False)
    _, alone = evaluated
    dense = ir.read_trec_run(str(tmp_path / "run.retrieval.trec"))
    assert dense == ir.read_trec_run(os.path.join(alone, "run.retrieval.trec"))  # first stage: the checkpoint
    corpus = {k: data.doc_text(v) for k, v in data.load_corpus(task).items()}
    queries = data.load_queries(task)
    want = retrieval.rerank(bare_base(base_dir), queries, corpus, dense, K_RERANK, progress=False)
    assert ir.read_trec_run(str(tmp_path / "run.two_stage.trec")) == want  # second stage: the other model
    assert result["provenance"]["reranker"]["path"] == os.path.abspath(base_dir)
    costs = result["costs"]
    assert costs["params_reranker"]["unified_bytes"] == costs["params"]["base_bytes"]
    assert costs["evaluated_param_bytes"] == costs["params"]["unified_bytes"] + costs["params"]["base_bytes"]


def test_candidates_are_reranked_and_scored_as_their_own_stages(run, task, evaluated, tmp_path):
    result, out = evaluated
    candidates = os.path.join(out, "run.retrieval.trec")  # the dense run as a given candidate file
    got = ev.evaluate_checkpoint(run, task, "test", k_rerank=K_RERANK, candidates=candidates,
                                 out_dir=str(tmp_path), progress=False)
    assert got["runs"]["rerank"] == "run.rerank.trec"
    assert got["candidates"] == result["retrieval"]
    assert got["rerank"] == result["two_stage"]  # the same candidates reranked by the same model
    assert ir.read_trec_run(str(tmp_path / "run.rerank.trec")) == ir.read_trec_run(
        os.path.join(out, "run.two_stage.trec"))
    assert got["provenance"]["candidates"] == os.path.abspath(candidates)
    assert got["costs"]["latency"]["rerank_pairs_per_query"] == K_RERANK


def test_max_doc_len_truncates_documents_in_both_stages(run):
    um, _ = unimoer.load_model(run, max_doc_len=8)
    long_doc = " ".join(["tova ku rune"] * 50)
    assert um.tokens_documents([long_doc])["input_ids"].shape[1] == 8
    frame = um.tok.encode_ids([config.format_rerank_pair("", "", um.cfg.data.rerank_instruction)], 10**9,
                              add_special_tokens=False)[0]
    budget = len(um.prefix_ids) + len(um.suffix_ids) + len(frame) + um.cfg.data.max_query_len + 8
    assert um.cfg.data.max_pair_len == budget  # template + instruction + max_query_len + 8 document tokens
    assert um.tokens_pairs(["tova"], [long_doc])["input_ids"].shape[1] == budget

# --------------------------------------------------------------------------------------------- costs
def test_costs_count_the_base_once_unified_and_twice_for_two_separate_models(run, evaluated):
    params = evaluated[0]["costs"]["params"]
    base = sum(t.numel() * t.element_size() for t in load_file(os.path.join(run, "base", "model.safetensors")).values())
    adapters = load_file(os.path.join(unimoer.checkpoint_dir(run), "adapters.safetensors"))
    assert params["base_bytes"] == base
    assert params["unified_bytes"] == base + sum(t.numel() * 4 for t in adapters.values())
    e = params["experts_bytes"]
    lora = sum(t.numel() * 4 for k, t in adapters.items() if k.endswith((".lora_A", ".lora_B")))
    assert set(e) == {"embed", "rerank", "shared"} and sum(e.values()) == lora
    assert e["embed"] == e["rerank"] == e["shared"] > 0  # all rank 4 in tiny_setup
    assert params["two_models_experts"] == {"embed": ["embed", "shared"], "rerank": ["rerank", "shared"]}
    assert params["two_models_bytes"] == 2 * base + e["embed"] + e["rerank"] + 2 * e["shared"]
    assert params["saving"] == pytest.approx(1 - params["unified_bytes"] / params["two_models_bytes"])
    costs = evaluated[0]["costs"]
    assert costs["peak_memory_kind"].startswith("cpu process peak RSS") and costs["peak_memory_bytes"] > 0
    assert costs["latency"]["two_stage_s_per_query"] > costs["latency"]["retrieval_s_per_query"] > 0


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("missing", ["adapters.safetensors", "config.yaml", "latest"])
def test_a_missing_checkpoint_file_is_one_clear_error_naming_it(run, tmp_path, missing):
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    ckpt = unimoer.checkpoint_dir(copy)
    os.remove(os.path.join(copy, "latest") if missing == "latest" else os.path.join(ckpt, missing))
    for path in [copy] if missing == "latest" else [copy, ckpt]:  # the run directory and the checkpoint itself
        with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
            ev.evaluate_checkpoint(path, write=False, progress=False)


def test_cli_error_is_one_line_on_stderr_with_exit_code_2(run, tmp_path, capsys):
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    os.remove(os.path.join(unimoer.checkpoint_dir(copy), "adapters.safetensors"))
    assert ev.cli([copy]) == 2  # the CLI's error path (model.run_cli); ev.main raises
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and "adapters.safetensors" in captured.err


def test_a_wrong_data_path_is_one_clear_error(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: data directory not found"):
        ev.evaluate_checkpoint(run, str(tmp_path / "nowhere"), write=False, progress=False)


def test_a_plain_model_directory_needs_data(run):
    with pytest.raises(ir.EvalError, match="pass --data"):
        ev.evaluate_checkpoint(os.path.join(run, "base"), write=False, progress=False)


@pytest.mark.parametrize("line, message", [("q1 Q0 d1 1 0.5\n", r"bad\.trec:2: expected 6 fields"),
                                           ("Q Q0 nodoc 1 0.5 x\n", r"bad\.trec: document 'nodoc'")])
def test_a_malformed_candidate_run_names_the_file(run, task, tmp_path, line, message):
    qid = sorted(judged_test_qrels(task))[0]
    bad = tmp_path / "bad.trec"
    bad.write_text(f"{qid} Q0 d00001 1 1.0 x\n" + line.replace("Q ", qid + " "))
    with pytest.raises(ir.EvalError, match=message):
        ev.evaluate_checkpoint(run, task, "test", candidates=str(bad), write=False, progress=False)


# --------------------------------------------------------------------------------------------- torchrun
SHARD_WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import evaluate
import unimoer

torch.set_num_threads(1)
counts = {{"documents": 0, "pairs": 0}}
load_model = unimoer.load_model

def counting_load_model(*args, **kwargs):  # count what this rank encodes and scores
    um, info = load_model(*args, **kwargs)
    encode_documents, score_pairs = um.encode_documents, um.score_pairs
    def encode(texts, batch_size=64):
        counts["documents"] += len(texts)
        return encode_documents(texts, batch_size)
    def score(queries, docs, batch_size=32):
        counts["pairs"] += len(queries)
        return score_pairs(queries, docs, batch_size)
    um.encode_documents, um.score_pairs = encode, score
    return um, info

evaluate.load_model = counting_load_model  # where evaluate_checkpoint looks it up
ckpt, data_dir, out = sys.argv[1:4]
result = evaluate.evaluate_checkpoint(ckpt, data_dir, "test", k_rerank={k}, batch_size=16, out_dir=out, progress=False)
with open(out + ".rank" + os.environ["RANK"] + ".json", "w") as f:
    json.dump({{"counts": counts, "returned": result is not None}}, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_sharded_evaluation_under_torchrun_equals_one_process(run, task, tmp_path):
    script = tmp_path / "shard_worker.py"
    script.write_text(SHARD_WORKER.format(repo=tiny_setup.REPO, k=K_RERANK))
    sharded = str(tmp_path / "sharded")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), run, task, sharded]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=tiny_setup.SUBPROCESS_ENV)
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    one = ev.evaluate_checkpoint(run, task, "test", k_rerank=K_RERANK, batch_size=16, out_dir=str(tmp_path / "one"),
                                 progress=False)

    ranks = [load_json(f"{sharded}.rank{r}.json") for r in (0, 1)]
    assert [r["returned"] for r in ranks] == [True, False]  # only rank 0 evaluates and writes
    # the work was split: each rank encoded part of the 300 documents (+ the E2Rank baseline's: the distinct
    # documents of the dense run's top 5) and scored part of the 16 x 5 pairs
    dense = ir.read_trec_run(str(tmp_path / "one" / "run.retrieval.trec"))
    e2rank_docs = len({d for docs in dense.values() for d in ir.rank_documents(docs)[:K_RERANK]})
    assert sum(r["counts"]["documents"] for r in ranks) == 300 + e2rank_docs
    assert min(r["counts"]["documents"] for r in ranks) > 0
    assert sum(r["counts"]["pairs"] for r in ranks) == 16 * K_RERANK and min(r["counts"]["pairs"] for r in ranks) > 0
    for name in ("run.retrieval.trec", "run.two_stage.trec", "run.e2rank_two_stage.trec", "per_query.json"):  # bitwise
        with open(os.path.join(sharded, name), "rb") as a, open(str(tmp_path / "one" / name), "rb") as b:
            assert a.read() == b.read(), name
    metrics = load_json(os.path.join(sharded, "metrics.json"))
    assert metrics["costs"]["world_size"] == 2
    assert (metrics["retrieval"], metrics["two_stage"]) == (one["retrieval"], one["two_stage"])


# --------------------------------------------------------------------------------------------- MTEB
class PromptType(enum.Enum):  # as mteb passes it (mteb.encoder_interface.PromptType), without importing mteb
    query = "query"
    passage = "passage"


@pytest.fixture(scope="module")
def mteb_encoder(run):
    return unimoer.MTEBEncoder(run)


TEXTS = ["tova ku rune", "what is the largest of the many data units found near the field", "x"]


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("append_eos", [True, False])
def test_mteb_query_vectors_equal_encode_queries_for_both_append_eos_values(run, append_eos):
    """The MTEB encoder tokenises queries through the model's own path (issue 12: it re-tokenised them with
    add_eos=True hard-coded, so with data.append_eos false its query vectors differed from encode_queries)."""
    um = unimoer.load_run(run)
    um.cfg.data.append_eos = append_eos
    enc = unimoer.MTEBEncoder(um)
    close(enc.encode(TEXTS, prompt_type="query", batch_size=2), um.encode_queries(TEXTS))
    last = um.tokens_queries(TEXTS)["input_ids"][:, -1]  # left padding: the last column is each query's end
    assert (last == um.tok.eos_id).all().item() is append_eos


def test_mteb_encoder_returns_one_unit_float32_row_per_sentence(mteb_encoder):
    for prompt_type in ("query", "document", None):
        emb = mteb_encoder.encode(TEXTS, task_name="SciFact", prompt_type=prompt_type, batch_size=2)
        assert isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.shape == (3, 32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert mteb_encoder.encode([], prompt_type="query").shape == (0, 32)


def test_mteb_encoder_prompt_type_switches_between_query_and_document_formats(mteb_encoder):
    # (the encoder sorts a batch by length; another row order moves fp32 rounding by ~1e-7, hence a tolerance)
    um = mteb_encoder.model
    query, doc = um.encode_queries(TEXTS), um.encode_documents(TEXTS)
    assert not np.allclose(query, doc, atol=1e-4)
    close(mteb_encoder.encode(TEXTS, prompt_type="query"), query)
    close(mteb_encoder.encode(TEXTS, prompt_type=PromptType.query), query)
    for prompt_type in ("document", "passage", PromptType.passage, None):
        close(mteb_encoder.encode(TEXTS, prompt_type=prompt_type), doc)
    # a BEIR-style {"title", "text"} document is joined as the loaders join it
    close(mteb_encoder.encode([{"title": "tova", "text": "ku rune"}]), doc[:1])
    with pytest.raises(ir.EvalError, match="prompt_type"):
        mteb_encoder.encode(TEXTS, prompt_type="summary")


def test_mteb_encoder_task_instruction_changes_queries_only(run):
    enc = unimoer.MTEBEncoder(run, task_instructions={"SciFact": "Retrieve evidence for the claim"})
    plain = enc.encode(TEXTS, task_name="Other", prompt_type="query")
    close(plain, enc.model.encode_queries(TEXTS))
    assert not np.allclose(enc.encode(TEXTS, task_name="SciFact", prompt_type="query"), plain, atol=1e-4)
    close(enc.encode(TEXTS, task_name="SciFact", prompt_type="passage"),
          enc.encode(TEXTS, task_name="Other", prompt_type="passage"))
