"""data.py: BEIR loaders, training files, templates, the synthetic task, TrainSampler, hard-negative mining."""
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

import config
import data
import ir
import synthetic
import tiny_setup
from data import DataError
from model import load_tokenizer


# --------------------------------------------------------------------------------------------- helpers
def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture
def beir(tmp_path):
    """A tiny hand-written BEIR folder."""
    d = str(tmp_path / "beir")
    write(os.path.join(d, "corpus.jsonl"),
          '{"_id": "d1", "title": "Paris", "text": "The capital of France."}\n'
          '{"_id": 2, "text": "No title here."}\n'
          '\n'
          '{"_id": "d3", "title": "", "text": "  spaced  "}\n')
    write(os.path.join(d, "queries.jsonl"),
          '{"_id": "q1", "text": "capital of france", "metadata": {}}\n'
          '{"_id": "q2", "text": "untitled"}\n')
    write(os.path.join(d, "qrels", "test.tsv"), "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\t2\t0\nq2\t2\t1\n")
    return d


def bm25_scores(queries, docs, k1=0.9, b=0.4):
    """Okapi BM25 (Pyserini's k1, b) over whitespace tokens: (n_queries, n_docs) scores."""
    vocab = {}
    tfs = [Counter(d.split()) for d in docs]
    for tf in tfs:
        for w in tf:
            vocab.setdefault(w, len(vocab))
    tf_mat = np.zeros((len(docs), len(vocab)))
    for j, tf in enumerate(tfs):
        for w, c in tf.items():
            tf_mat[j, vocab[w]] = c
    dl = tf_mat.sum(1)
    df = (tf_mat > 0).sum(0)
    idf = np.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
    weight = idf * tf_mat * (k1 + 1) / (tf_mat + k1 * (1 - b + b * dl / dl.mean())[:, None])
    scores = np.zeros((len(queries), len(docs)))
    for i, q in enumerate(queries):
        cols = [vocab[w] for w in q.split() if w in vocab]
        scores[i] = weight[:, cols].sum(1)
    return scores


def ndcg10(scores, doc_ids, qids, qrels):
    """Mean nDCG@10 with gains 2^rel - 1; ties broken by document order."""
    out = []
    for i, qid in enumerate(qids):
        top = np.argsort(-scores[i], kind="stable")[:10]
        dcg = sum((2 ** qrels[qid].get(doc_ids[j], 0) - 1) / math.log2(r + 2) for r, j in enumerate(top))
        ideal = sorted(qrels[qid].values(), reverse=True)[:10]
        out.append(dcg / sum((2 ** g - 1) / math.log2(r + 2) for r, g in enumerate(ideal)))
    return float(np.mean(out))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("synth") / "s0")
    synthetic.make_synthetic(d, seed=0)
    return d


def split_queries(synth, split):
    qrels = data.load_qrels(synth, split)
    queries = data.load_queries(synth)
    return qrels, [queries[q] for q in qrels], list(qrels)


# --------------------------------------------------------------------------------------------- BEIR loaders
def test_load_corpus_reads_titles_texts_and_string_ids(beir):
    corpus = data.load_corpus(beir)
    assert corpus == {"d1": {"title": "Paris", "text": "The capital of France."},
                      "2": {"title": "", "text": "No title here."},
                      "d3": {"title": "", "text": "  spaced  "}}


def test_load_queries_reads_text_and_ignores_other_fields(beir):
    assert data.load_queries(beir) == {"q1": "capital of france", "q2": "untitled"}


def test_load_qrels_skips_header_and_keeps_graded_scores(beir):
    assert data.load_qrels(beir, "test") == {"q1": {"d1": 2, "2": 0}, "q2": {"2": 1}}


def test_doc_text_joins_title_and_text_the_beir_way(beir):
    corpus = data.load_corpus(beir)
    assert data.doc_text(corpus["d1"]) == "Paris The capital of France."
    assert data.doc_text(corpus["2"]) == "No title here."
    assert data.doc_text(corpus["d3"]) == "spaced"


MALFORMED = {
    # name: (relative file, content, loader, expected line, message fragment)
    "corpus_bad_json": ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', "corpus", 2,
                        "invalid JSON"),
    "corpus_missing_id": ("corpus.jsonl", '{"_id": "a", "text": "x"}\n\n{"text": "y"}\n', "corpus", 3, '"_id"'),
    "corpus_duplicate_id": ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "corpus", 2,
                            "duplicate"),
    "corpus_text_not_string": ("corpus.jsonl", '{"_id": "a", "text": 5}\n', "corpus", 1, '"text"'),
    "queries_missing_text": ("queries.jsonl", '{"_id": "q"}\n', "queries", 1, '"text"'),
    "qrels_wrong_columns": ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1 d2 1\n", "qrels", 3,
                            "3 tab-separated columns"),
    "qrels_non_integer_score": ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1.5\n", "qrels", 2,
                                "integer"),
    "train_pos_empty": ("train.jsonl", '{"query": "q", "pos": ["p"], "neg": []}\n'
                                       '{"query": "q", "pos": [], "neg": []}\n', "train", 2, '"pos" must not be empty'),
    "train_neg_not_list": ("train.jsonl", '{"query": "q", "pos": ["p"], "neg": "n"}\n', "train", 1, '"neg"'),
    "train_missing_neg": ("train.jsonl", '{"query": "q", "pos": ["p"], "negs": []}\n', "train", 1, '"neg"'),
    "train_scores_length": ("train.jsonl", '{"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [1, 2]}\n',
                            "train", 1, '"neg_scores"'),
    "triples_wrong_columns": ("triples.tsv", "q\tp\tn\nq\tp\n", "triples", 2, "3 tab-separated columns"),
}
LOADERS = {"corpus": data.load_corpus, "queries": data.load_queries, "qrels": lambda d: data.load_qrels(d, "test"),
           "train": lambda d: data.read_train_jsonl(os.path.join(d, "train.jsonl")),
           "triples": lambda d: data.read_triples_tsv(os.path.join(d, "triples.tsv"))}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_error_names_file_and_line(tmp_path, case):
    rel, content, loader, line, fragment = MALFORMED[case]
    path = write(str(tmp_path / rel), content)
    with pytest.raises(DataError) as e:
        LOADERS[loader](str(tmp_path))
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert fragment in str(e.value)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_missing_file_error_names_the_path(tmp_path, loader):
    with pytest.raises(DataError, match="file not found") as e:
        LOADERS[loader](str(tmp_path))
    assert str(tmp_path) in str(e.value)


# --------------------------------------------------------------------------------------------- training files
def test_read_train_jsonl_keeps_scores_and_drops_other_keys(tmp_path):
    path = write(str(tmp_path / "t.jsonl"),
                 '{"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "neg_scores": [0.5, 0], "prompt": "x"}\n\n'
                 '{"query": "r", "pos": ["p2", "p3"], "neg": [], "pos_scores": [2, 1]}\n')
    assert data.read_train_jsonl(path) == [
        {"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "neg_scores": [0.5, 0]},
        {"query": "r", "pos": ["p2", "p3"], "neg": [], "pos_scores": [2, 1]}]


def test_write_train_jsonl_round_trips_and_leaves_no_temp_file(tmp_path):
    examples = [{"query": "café ?", "pos": ["p"], "neg": ["n1", "n2"]}, {"query": "q2", "pos": ["a", "b"], "neg": []}]
    path = str(tmp_path / "out" / "train.jsonl")
    data.write_train_jsonl(path, examples)
    assert data.read_train_jsonl(path) == examples
    assert os.listdir(tmp_path / "out") == ["train.jsonl"]


def test_write_train_jsonl_rejects_invalid_example_and_keeps_old_file(tmp_path):
    path = write(str(tmp_path / "train.jsonl"), '{"query": "q", "pos": ["p"], "neg": []}\n')
    with pytest.raises(DataError, match="example 1"):
        data.write_train_jsonl(path, [{"query": "a", "pos": ["b"], "neg": []}, {"query": "a", "pos": [], "neg": []}])
    assert data.read_train_jsonl(path) == [{"query": "q", "pos": ["p"], "neg": []}]


def test_read_triples_tsv_merges_negatives_of_same_query_and_positive(tmp_path):
    path = write(str(tmp_path / "triples.tsv"), "q1\tp1\tn1\nq2\tp2\tn3\nq1\tp1\tn2\nq1\tp1\tn1\n")
    assert data.read_triples_tsv(path) == [{"query": "q1", "pos": ["p1"], "neg": ["n1", "n2"]},
                                           {"query": "q2", "pos": ["p2"], "neg": ["n3"]}]


# --------------------------------------------------------------------------------------------- templates
def test_embedding_query_template_is_qwen3_embedding_format():
    assert config.EMBED_INSTRUCTION == "Given a web search query, retrieve relevant passages that answer the query"
    assert config.format_query("what is x") == ("Instruct: Given a web search query, retrieve relevant passages that "
                                              "answer the query\nQuery:what is x")
    assert config.format_query("q", "Find it") == "Instruct: Find it\nQuery:q"


def test_rerank_template_is_qwen3_reranker_format():
    assert config.RERANK_INSTRUCTION == config.EMBED_INSTRUCTION
    assert config.RERANK_PREFIX == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
    assert config.RERANK_SUFFIX == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert config.format_rerank_pair("q", "d", "I") == "<Instruct>: I\n<Query>: q\n<Document>: d"
    assert config.format_rerank_pair("q", "d").startswith(f"<Instruct>: {config.RERANK_INSTRUCTION}\n")


# --------------------------------------------------------------------------------------------- synthetic task
def test_synthetic_same_seed_gives_identical_bytes(synth, tmp_path):
    again = str(tmp_path / "again")
    synthetic.make_synthetic(again, seed=0)
    files = tiny_setup.read_tree(synth)
    assert sorted(files) == sorted(["corpus.jsonl", "queries.jsonl", "train.jsonl", "tokenizer.json", "lexicon.json",
                                    "tokenizer_config.json", "qa.jsonl"] + [os.path.join("qrels", f"{s}.tsv")
                                                                for s in ("train", "dev", "test")])
    assert tiny_setup.read_tree(again) == files


def test_synthetic_different_seed_differs(synth, tmp_path):
    other = str(tmp_path / "other")
    synthetic.make_synthetic(other, seed=1)
    a, b = tiny_setup.read_tree(synth), tiny_setup.read_tree(other)
    for name in ("corpus.jsonl", "queries.jsonl", "train.jsonl"):
        assert a[name] != b[name]


def test_synthetic_default_sizes_and_text_lengths(synth):
    corpus, queries = data.load_corpus(synth), data.load_queries(synth)
    assert len(corpus) == 2000 and len(queries) == 2400
    assert [len(data.load_qrels(synth, s)) for s in ("train", "dev", "test")] == [2000, 200, 200]
    assert all(15 <= len(data.doc_text(d).split()) <= 30 for d in corpus.values())
    assert all(4 <= len(q.split()) <= 8 for q in queries.values())


def test_synthetic_splits_are_disjoint(synth):
    qrels = {s: data.load_qrels(synth, s) for s in ("train", "dev", "test")}
    queries = data.load_queries(synth)
    ids = [set(q) for q in qrels.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len({queries[q] for q in queries}) == len(queries)  # no query text repeats across splits
    train_docs = {d for rel in qrels["train"].values() for d in rel}
    eval_docs = {d for s in ("dev", "test") for rel in qrels[s].values() for d in rel}
    assert not train_docs & eval_docs  # dev/test targets were never training positives


def test_synthetic_word_overlap_scores_low_on_test(synth):
    corpus = data.load_corpus(synth)
    doc_ids = list(corpus)
    qrels, qtexts, qids = split_queries(synth, "test")
    ndcg = ndcg10(bm25_scores(qtexts, [data.doc_text(corpus[d]) for d in doc_ids]), doc_ids, qids, qrels)
    assert ndcg < 0.3, ndcg


def test_synthetic_positive_is_the_unique_doc_with_both_query_concepts(synth):
    """Learnable: mapping words to concepts (lexicon.json) and counting shared concepts finds each target alone."""
    with open(os.path.join(synth, "lexicon.json")) as f:
        concept_of = {w: c for c, forms in enumerate(json.load(f)["concepts"]) for w in forms}
    corpus = data.load_corpus(synth)
    doc_concepts = {d: {concept_of[w] for w in data.doc_text(doc).split() if w in concept_of}
                    for d, doc in corpus.items()}
    for split in ("train", "dev", "test"):
        qrels, qtexts, qids = split_queries(synth, split)
        for qid, text in zip(qids, qtexts):
            words = text.split()
            concepts = {concept_of[w] for w in words if w in concept_of}
            assert len(concepts) == 2
            matches = [d for d, cs in doc_concepts.items() if concepts <= cs]
            assert matches == list(qrels[qid]) and qrels[qid][matches[0]] == 2
            assert not set(words) & set(data.doc_text(corpus[matches[0]]).split())  # target shares no word


def test_synthetic_train_jsonl_has_target_and_lexical_traps_first(synth):
    examples = data.read_train_jsonl(os.path.join(synth, "train.jsonl"))
    corpus, queries = data.load_corpus(synth), data.load_queries(synth)
    qrels = data.load_qrels(synth, "train")
    assert [ex["query"] for ex in examples] == [queries[q] for q in qrels]
    for ex, qid in zip(examples, qrels):
        assert ex["pos"] == [data.doc_text(corpus[d]) for d in qrels[qid]]
        assert len(ex["neg"]) >= 7 and len(set(ex["neg"])) == len(ex["neg"]) and ex["pos"][0] not in ex["neg"]
        assert set(ex["query"].split()) & set(ex["neg"][0].split())  # hardest negative shares a query word


def test_synthetic_tokenizer_round_trips_templates_with_single_token_yes_no(synth):
    tok = load_tokenizer(synth)
    raw = tok.tok
    doc = data.doc_text(next(iter(data.load_corpus(synth).values())))
    query = next(iter(data.load_queries(synth).values()))
    texts = [config.RERANK_PREFIX + config.format_rerank_pair(query, doc) + config.RERANK_SUFFIX, config.format_query(query),
             doc, "yes", "no"]
    for text in texts:
        ids = raw.encode(text).ids
        assert tok.decode(ids) == text
    assert len(raw.encode("yes").ids) == 1 and raw.token_to_id("yes") is not None
    assert len(raw.encode("no").ids) == 1 and raw.token_to_id("no") is not None
    assert tok.eos_id == tok.pad_id == raw.token_to_id("<|endoftext|>")
    prefix_ids = raw.encode(config.RERANK_PREFIX).ids
    assert prefix_ids[0] == raw.token_to_id("<|im_start|>") and raw.token_to_id("<|im_end|>") in prefix_ids
    assert 500 <= tok.vocab_size <= 2000


# --------------------------------------------------------------------------------------------- sampler
def toy_examples(n=23, n_negs=lambda i: 3 + i % 6):
    return [{"query": f"q{i}", "pos": [f"p{i}.{k}" for k in range(1 + i % 2)],
             "neg": [f"n{i}.{k}" for k in range(n_negs(i))]} for i in range(n)]


def test_sampler_batch_is_a_pure_function_of_seed_and_step():
    ex = toy_examples()
    a = data.TrainSampler(ex, batch_size=4, n_neg=5, seed=7)
    steps = [0, 13, 3, 40, 5, 13]
    first = [a.batch(s) for s in steps]
    b = data.TrainSampler(ex, batch_size=4, n_neg=5, seed=7)  # a fresh "resumed" sampler, visited in another order
    assert [b.batch(s) for s in reversed(steps)] == list(reversed(first))
    assert data.TrainSampler(ex, batch_size=4, n_neg=5, seed=8).batch(0) != first[0]


def test_sampler_epoch_visits_examples_once_without_replacement():
    ex = toy_examples()
    s = data.TrainSampler(ex, batch_size=4, n_neg=5, seed=0)
    assert s.steps_per_epoch == 5
    for epoch in range(3):
        seen = [p.example for step in range(epoch * 5, epoch * 5 + 5) for p in s.batch(step)]
        assert len(seen) == 20 and len(set(seen)) == 20
    for step in range(15):
        for p in s.batch(step):
            k = len(ex[p.example]["neg"])
            assert len(p.negs) == 5 and 0 <= p.pos < len(ex[p.example]["pos"])
            if k >= 5:
                assert list(p.negs) == sorted(set(p.negs))  # distinct, in file (hardness) order
            else:
                assert set(p.negs) == set(range(k))  # all of them before repeating


def test_sampler_ddp_rank_slices_union_to_global_batch():
    ex = toy_examples(40)
    single = data.TrainSampler(ex, batch_size=8, n_neg=3, seed=1)
    ranks = [data.TrainSampler(ex, batch_size=8, n_neg=3, seed=1, rank=r, world_size=4) for r in range(4)]
    for step in (0, 4, 5, 11):
        slices = [r.batch(step) for r in ranks]
        assert all(len(s) == 2 for s in slices)
        assert [p for s in slices for p in s] == single.batch(step)


def test_gather_texts_groups_negatives_per_query():
    ex = toy_examples(8)
    picks = [data.Pick(2, 0, (1, 0)), data.Pick(5, 1, (2, 2))]
    assert data.gather_texts(ex, picks) == {"query": ["q2", "q5"], "pos": ["p2.0", "p5.1"],
                                            "neg": ["n2.1", "n2.0", "n5.2", "n5.2"]}


def test_sampler_rejects_example_without_negatives():
    ex = toy_examples(8, n_negs=lambda i: 0 if i == 3 else 2)
    with pytest.raises(DataError, match="example 3"):
        data.TrainSampler(ex, batch_size=4, n_neg=1)
    data.TrainSampler(ex, batch_size=4, n_neg=0)  # in-batch negatives only: fine


# --------------------------------------------------------------------------------------------- mining
def mining_setup():
    """30 docs on a line: query "a" ranks them d0, d1, ..., d29; query "b" ranks them d29, ..., d0."""
    n = 30
    doc_emb = np.stack([np.ones(n), np.linspace(1.0, -1.0, n)], axis=1).astype(np.float32)
    query_emb = np.array([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]], dtype=np.float32)
    doc_ids = [f"d{j}" for j in range(n)]
    doc_texts = [f"text {j}" for j in range(n)]
    qrels = {"a": {"d3": 1, "d5": 2, "d7": 0}, "b": {"d28": 1}}  # "c" has no judgements
    return ["a", "b", "c"], ["query a", "query b", "query c"], doc_ids, doc_texts, qrels, query_emb, doc_emb


def test_mining_drops_positives_and_samples_inside_rank_window():
    qids, queries, doc_ids, doc_texts, qrels, qe, de = mining_setup()
    out = data.mine_hard_negatives(qids, queries, doc_ids, doc_texts, qrels, qe, de, rank_window=(2, 12), n_neg=5)
    assert [ex["query"] for ex in out] == ["query a", "query b"]  # no positives -> skipped
    assert out[0]["pos"] == ["text 5", "text 3"]  # highest score first
    ranks_a = [int(t.split()[1]) for t in out[0]["neg"]]
    assert len(ranks_a) == 5 and ranks_a == sorted(ranks_a)
    assert set(ranks_a) <= set(range(2, 12)) - {3, 5}  # judged-0 d7 may be a negative
    ranks_b = [29 - int(t.split()[1]) for t in out[1]["neg"]]  # b's rank of doc j is 29 - j
    assert len(ranks_b) == 5 and set(ranks_b) <= set(range(2, 12)) - {1}


def test_mining_is_deterministic_by_seed_and_limited_by_window_size():
    args = mining_setup()
    a = data.mine_hard_negatives(*args, rank_window=(0, 20), n_neg=6, seed=3)
    assert a == data.mine_hard_negatives(*args, rank_window=(0, 20), n_neg=6, seed=3)
    assert a != data.mine_hard_negatives(*args, rank_window=(0, 20), n_neg=6, seed=4)
    few = data.mine_hard_negatives(*args, rank_window=(0, 4), n_neg=8)
    assert few[0]["neg"] == ["text 0", "text 1", "text 2"]  # ranks 0..3 minus positive d3


def beir_folder(root, docs: dict, queries: dict, qrels: list) -> str:
    """A BEIR folder by hand: corpus, queries, qrels/train.tsv."""
    os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
    with open(os.path.join(root, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps({"_id": k, "text": v}) + "\n" for k, v in docs.items())
    with open(os.path.join(root, "queries.jsonl"), "w") as f:
        f.writelines(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items())
    with open(os.path.join(root, "qrels", "train.tsv"), "w") as f:
        f.writelines(f"{q}\t{d}\t{g}\n" for q, d, g in qrels)
    return str(root)


def test_mining_from_a_trec_run_takes_the_window_of_its_ranking_without_positives(tmp_path):
    """data.py mine reads a run evaluate.py wrote (no model inside data.py): ranks follow the run's scores."""
    beir = beir_folder(tmp_path / "beir", {f"d{i}": f"doc {i}" for i in range(1, 6)},
                       {"q1": "first", "q2": "second", "q3": "not in the run"},
                       [("q1", "d2", 1), ("q2", "d5", 2), ("q3", "d1", 1)])
    run_path = str(tmp_path / "run.trec")
    ir.write_trec_run(run_path, {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.1},
                                 "q2": {"d4": 0.5, "d5": 0.4, "d3": 0.6}})
    out = data.mine_from_run(run_path, beir, "train", rank_window=(0, 3), n_neg=2)
    # q1: ranks 0-2 are d1, d2, d3; the positive d2 is dropped. q2: d3, d4, d5 -> d3, d4. q3: not in the run.
    assert out == [{"query": "first", "pos": ["doc 2"], "neg": ["doc 1", "doc 3"]},
                   {"query": "second", "pos": ["doc 5"], "neg": ["doc 3", "doc 4"]}]


def test_mining_from_a_run_naming_an_unknown_document_is_one_error(tmp_path):
    beir = beir_folder(tmp_path / "beir", {"d1": "a"}, {"q1": "b"}, [("q1", "d1", 1)])
    run_path = str(tmp_path / "run.trec")
    ir.write_trec_run(run_path, {"q1": {"d1": 1.0, "d9": 0.5}})
    with pytest.raises(DataError, match=r"run\.trec: document 'd9' \(query 'q1'\) is not in .*corpus\.jsonl"):
        data.mine_from_run(run_path, beir)

