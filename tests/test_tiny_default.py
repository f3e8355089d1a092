"""The tiny default's pieces: the pretrained tiny base (reproducible, reads the corpus only), subword BM25, the
fixed dev candidates and the Experiment runner's command grid."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import config
import evaluate
import ir
import retrieval
import runs
import train
import unimoer
from tiny_setup import REPO, SUBPROCESS_ENV, write_config, write_synthetic

PRETRAIN = {"pretrain_steps": 3, "pretrain_batch": 4}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("syn") / "data"))


@pytest.fixture(scope="module")
def corpus_only(synthetic, tmp_path_factory):
    """A copy of the task holding only what the base may read: corpus.jsonl and the tokenizer files (no
    queries.jsonl, qrels/ or train.jsonl, so reading any of them fails)."""
    d = tmp_path_factory.mktemp("corpus_only") / "data"
    d.mkdir()
    for name in ("corpus.jsonl", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(synthetic, name), d / name)
    return str(d)


def tiny_cfg(tmp_path, data_dir, **tiny):
    path = write_config(str(tmp_path / "c.yaml"), data_dir, str(tmp_path / "run"), model={"tiny": tiny})
    return config.load_config(path)


def test_pretrained_tiny_base_is_reproducible_from_its_seed(corpus_only, tmp_path, one_thread):
    cfg = tiny_cfg(tmp_path, corpus_only, **PRETRAIN)
    for name in ("a", "b"):
        runs.write_tiny_base(cfg, str(tmp_path / name))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_changes_the_random_base(corpus_only, tmp_path, one_thread):
    runs.write_tiny_base(tiny_cfg(tmp_path, corpus_only, **PRETRAIN), str(tmp_path / "pre"))
    runs.write_tiny_base(tiny_cfg(tmp_path, corpus_only), str(tmp_path / "rand"))
    pre, rand = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("pre", "rand"))
    assert not torch.equal(pre["model.embed_tokens.weight"], rand["model.embed_tokens.weight"])


def test_tiny_base_reads_no_queries_qrels_or_training_file(corpus_only, tmp_path, one_thread, monkeypatch):
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    runs.write_tiny_base(tiny_cfg(tmp_path, corpus_only, **PRETRAIN), str(tmp_path / "base"))
    read = {os.path.basename(f) for f in opened if f.startswith(corpus_only)}
    assert read == {"corpus.jsonl", "tokenizer.json", "tokenizer_config.json"}  # tokenizer files: copied into the base


def test_pretrain_sequence_is_documents_then_the_first_again():
    docs = [[10, 11], [20], [30, 31, 32]]
    seqs = runs.pretrain_sequences(docs, eos=0, n_docs=2, batch=3, seed=1, step=0)
    for s in seqs:
        ends = [i for i, t in enumerate(s) if t == 0]  # the EOS after each document
        parts = [s[a + 1:b] for a, b in zip([-1] + ends[:-1], ends)]
        assert ends[-1] == len(s) - 1 and len(parts) == 3 and parts[0] == parts[2] != parts[1]
        assert all(p in docs for p in parts)
    assert seqs == runs.pretrain_sequences(docs, eos=0, n_docs=2, batch=3, seed=1, step=0)


def test_the_pretrained_base_is_cached_next_to_the_data_and_copied_into_the_run(synthetic, tmp_path, one_thread):
    cfg = tiny_cfg(tmp_path, synthetic, **PRETRAIN)
    cache = runs.tiny_base_cache_dir(cfg)
    assert os.path.dirname(cache) == os.path.dirname(os.path.normpath(synthetic))
    train.prepare(cfg, 0)
    run_base = os.path.join(cfg.train.out_dir, "base", "model.safetensors")
    assert open(os.path.join(cache, "model.safetensors"), "rb").read() == open(run_base, "rb").read()


def test_bm25_matches_a_hand_computed_score():
    # N = 2 docs, avgdl = 2.5; term 7 in d1 only: idf = ln(1 + (2 - 1 + .5) / (1 + .5)) = ln 2.
    # d1 = [7, 7, 8] (|d| = 3): tf 2 -> ln2 * 2 * 1.9 / (2 + 0.9 * (0.6 + 0.4 * 3 / 2.5))
    run = retrieval.bm25_run({"q": [7]}, {"d1": [7, 7, 8], "d2": [8, 9]}, k=2)
    expected = 0.6931471805599453 * 2 * 1.9 / (2 + 0.9 * (0.6 + 0.4 * 3 / 2.5))
    assert run["q"]["d1"] == pytest.approx(expected, rel=1e-12) and run["q"]["d2"] == 0.0


def test_dev_candidates_do_not_depend_on_the_model(synthetic, tmp_path, one_thread):
    cfg = train.prepare(tiny_cfg(tmp_path, synthetic), 0)
    dev = evaluate.load_dev(cfg)
    cands = []
    for seed in (0, 1):
        cfg.train.seed = seed
        cands.append(evaluate.dev_candidates(unimoer.build_model(cfg, torch.device("cpu")), dev, cfg))
    assert cands[0] == cands[1] and set(cands[0]) == set(dev[1])
    assert ir.read_trec_run(os.path.join(cfg.train.out_dir, evaluate.DEV_CANDIDATES)) == cands[1]


def test_runner_grid_covers_every_mode_and_seed(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/run_experiments.py", "--exp", "1", "--seeds", "1", "2",
                          "--out", str(tmp_path), "--dry-run"], cwd=REPO, env=SUBPROCESS_ENV, check=True,
                         capture_output=True, text=True).stdout
    trains = [ln for ln in out.splitlines() if "train.py " in ln]  # the command names train.py by its absolute path
    assert len(trains) == 7 * 2
    for mode in config.MODES:
        for seed in (1, 2):
            assert any(f"tiny_{mode}.yaml" in ln and f"--train.seed={seed}" in ln for ln in trains)
    assert out.count("analysis.py report") == 1


def test_runner_whole_set_trains_each_specialist_once(tmp_path):
    # Experiments 2 and 3 report against Experiment 1's emb_only / rank_only runs instead of training them again.
    out = subprocess.run([sys.executable, "benchmarks/run_experiments.py", "--exp", "1", "2", "3", "--seeds", "1",
                          "2", "--out", str(tmp_path), "--dry-run", "--jobs", "2"], cwd=REPO, env=SUBPROCESS_ENV,
                         check=True, capture_output=True, text=True).stdout
    trains = [ln for ln in out.splitlines() if "train.py " in ln]  # the command names train.py by its absolute path
    assert len(trains) == (7 + 7 + 2) * 2
    for spec in ("emb_only", "rank_only"):
        runs = [ln for ln in trains if f"tiny_{spec}.yaml" in ln]
        assert len(runs) == 2 and all(f"exp1{os.sep}{spec}_s" in ln for ln in runs)
    reports = [ln for ln in out.splitlines() if "analysis.py report" in ln]
    assert len(reports) == 1 + 7 + 2
    assert all(f"exp1{os.sep}rank_only_s1" in ln for ln in reports)
