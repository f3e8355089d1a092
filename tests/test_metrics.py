"""ir.py and retrieval.py: metrics against pytrec_eval (the independent reference), run files, faiss, pipeline."""
import random
import re
import zlib

import faiss
import numpy as np
import pytest
import pytrec_eval

import ir
import retrieval


# --------------------------------------------------------------------------------------------- helpers
def random_qrels_and_run(seed, n_queries=40, n_docs=60):
    """Graded qrels (0..3) and a run with many tied scores; ids of mixed length and case so the doc-id
    tie-break order matters ("d9" vs "d10" vs "D9"). Some queries have no relevant doc, some judged queries
    are missing from the run, some run queries are unjudged."""
    rng = random.Random(seed)
    doc_ids = [rng.choice(["d", "D", "doc", "x"]) + str(rng.randrange(200)) for _ in range(n_docs)]
    doc_ids = sorted(set(doc_ids))
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        judged = rng.sample(doc_ids, rng.randint(1, 15))
        qrels[qid] = {d: rng.choice([0, 0, 1, 2, 3]) for d in judged}
        if q % 7 == 0:
            qrels[qid] = {d: 0 for d in judged}  # judged but nothing relevant
        if q % 11 == 3:
            continue  # judged query missing from the run
        n_levels = rng.choice([1, 2, 3, 5, 1000])  # few levels -> many ties
        run[qid] = {d: float(rng.randrange(n_levels)) / 4 for d in rng.sample(doc_ids, rng.randint(1, len(doc_ids)))}
    run["unjudged"] = {doc_ids[0]: 1.0}
    return qrels, run


def pytrec_reference(qrels, run):
    """Per-query {ndcg@10, mrr@10, recall@100, map@100, ndcg@3, recall@5, map@5} from pytrec_eval. MRR@10 is
    recip_rank on the run cut to its top 10 under trec_eval's order (pytrec_eval re-sorts what it gets)."""
    measures = {"ndcg_cut_10", "ndcg_cut_3", "recall_100", "recall_5", "map_cut_100", "map_cut_5"}
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    top10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(ir.truncate_run(run, 10))
    names = {"ndcg_cut_10": "ndcg@10", "ndcg_cut_3": "ndcg@3", "recall_100": "recall@100", "recall_5": "recall@5",
             "map_cut_100": "map@100", "map_cut_5": "map@5"}
    return {qid: {**{names[m]: v for m, v in values.items()}, "mrr@10": top10[qid]["recip_rank"]}
            for qid, values in full.items()}


KS = dict(k_ndcg=(10, 3), k_mrr=(10,), k_recall=(100, 5), k_map=(100, 5))


class HashingEncoder:
    """Fake encoder: L2-normalised bag-of-words hashing vectors (so retrieval = word-overlap cosine);
    score_pairs = number of distinct query words in the document minus a small length penalty."""

    def __init__(self, dim=256):
        self.dim = dim
        self.calls = []

    def _vec(self, text):
        v = np.zeros(self.dim, dtype=np.float32)
        for w in re.findall(r"\w+", text.lower()):
            v[zlib.crc32(w.encode()) % self.dim] += 1.0
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def encode_queries(self, texts, batch_size):
        self.calls.append(("q", list(texts)))
        return np.stack([self._vec(t) for t in texts])

    def encode_documents(self, texts, batch_size):
        self.calls.append(("d", list(texts)))
        return np.stack([self._vec(t) for t in texts])

    def score_pairs(self, queries, docs, batch_size):
        self.calls.append(("p", list(zip(queries, docs))))
        return np.array([len(set(re.findall(r"\w+", q.lower())) & set(re.findall(r"\w+", d.lower())))
                         - 0.01 * len(d) for q, d in zip(queries, docs)])


def clustered(n, d, n_clusters, seed, noise=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centers[rng.integers(n_clusters, size=n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_per_query_metrics_match_pytrec_eval_with_ties(seed):
    qrels, run = random_qrels_and_run(seed)
    ref = pytrec_reference(qrels, run)
    ours = ir.evaluate_run(qrels, run, missing="skip", **KS)["per_query"]
    assert set(ours) == {q for q in ref if any(g > 0 for g in qrels[q].values())}
    for qid, values in ours.items():
        for name, value in values.items():
            assert value == pytest.approx(ref[qid][name], abs=1e-9), (seed, qid, name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_matches_pytrec_eval_over_judged_queries_in_run(seed):
    qrels, run = random_qrels_and_run(seed)
    ref = pytrec_reference(qrels, run)
    judged_in_run = [q for q in ref if any(g > 0 for g in qrels[q].values())]
    ours = ir.evaluate_run(qrels, run, missing="skip", **KS)
    assert ours["num_queries"] == len(judged_in_run)
    for name in ("ndcg@10", "ndcg@3", "mrr@10", "recall@100", "recall@5", "map@100", "map@5"):
        assert ours[name] == pytest.approx(np.mean([ref[q][name] for q in judged_in_run]), abs=1e-9)


def test_ties_broken_by_doc_id_descending_like_trec_eval():
    # Four tied documents, one relevant: trec_eval ranks "d" > "c" > "b" > "a", so "a" is 4th.
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}}
    assert ir.rank_documents(run["q"]) == ["d", "c", "b", "a"]
    assert ir.evaluate_run(qrels, run)["mrr@10"] == 0.25
    assert pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)["q"]["recip_rank"] == 0.25
    # Byte order: "a" > "B" and "d9" > "d10".
    assert ir.rank_documents({"B": 0.0, "a": 0.0}) == ["a", "B"]
    assert ir.rank_documents({"d10": 0.0, "d9": 0.0}) == ["d9", "d10"]


def test_result_does_not_depend_on_run_insertion_order():
    qrels, run = random_qrels_and_run(7)
    rng = random.Random(0)
    shuffled = {}
    for qid in rng.sample(list(run), len(run)):
        items = list(run[qid].items())
        rng.shuffle(items)
        shuffled[qid] = dict(items)
    a, b = ir.evaluate_run(qrels, run, **KS), ir.evaluate_run(qrels, shuffled, **KS)
    assert a == b


def test_scores_differing_by_1e_12_do_not_tie():
    assert ir.rank_documents({"a": 1.0, "b": 1.0 + 1e-12}) == ["b", "a"]


def test_ndcg_uses_linear_gain_and_ideal_from_judged_grades():
    # Relevant doc "r3" (grade 3) is judged but never retrieved; it still enters the ideal DCG.
    qrels = {"q": {"r1": 1, "r2": 2, "r3": 3, "n": 0}}
    run = {"q": {"r2": 3.0, "n": 2.0, "r1": 1.0}}
    dcg = 2 / np.log2(2) + 1 / np.log2(4)
    idcg = 3 / np.log2(2) + 2 / np.log2(3) + 1 / np.log2(4)
    assert ir.evaluate_run(qrels, run)["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-12)


def test_negative_grades_count_as_zero_gain_like_trec_eval():
    qrels = {"q": {"a": -1, "b": 2, "c": 1}}
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "ndcg_cut_1", "map_cut_10"}).evaluate(run)["q"]
    ours = ir.evaluate_run(qrels, run, k_ndcg=(10, 1), k_map=(10,))
    assert ours["ndcg@1"] == ref["ndcg_cut_1"] == 0.0
    assert ours["ndcg@10"] == pytest.approx(ref["ndcg_cut_10"], abs=1e-12)
    assert ours["map@10"] == pytest.approx(ref["map_cut_10"], abs=1e-12)


def test_msmarco_denominator_counts_judged_queries_missing_from_run_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}, "q4": {"d": 0}}  # q4: no relevant doc, not judged
    run = {"q1": {"a": 1.0, "x": 0.5}, "q2": {"y": 1.0, "b": 0.5}, "q4": {"d": 1.0}}
    zero = ir.evaluate_run(qrels, run, missing="zero")
    assert zero["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert zero["num_queries"] == 3 and zero["per_query"]["q3"]["mrr@10"] == 0.0
    skip = ir.evaluate_run(qrels, run, missing="skip")
    assert skip["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert skip["num_queries"] == 2


def test_mrr_ignores_relevant_documents_below_k():
    qrels = {"q": {"rel": 1}}
    run = {"q": {**{f"n{i}": 10.0 - i for i in range(10)}, "rel": 0.0}}
    assert ir.evaluate_run(qrels, run, k_mrr=(10, 11))["mrr@10"] == 0.0
    assert ir.evaluate_run(qrels, run, k_mrr=(10, 11))["mrr@11"] == pytest.approx(1 / 11)


def test_nan_score_is_rejected():
    with pytest.raises(ir.EvalError, match="NaN"):
        ir.evaluate_run({"q": {"a": 1}}, {"q": {"a": float("nan")}})


def test_drop_self_hits_removes_only_the_query_itself():
    run = {"q1": {"q1": 9.0, "d1": 1.0}, "q2": {"q1": 2.0, "d2": 1.0}}
    assert ir.drop_self_hits(run) == {"q1": {"d1": 1.0}, "q2": {"q1": 2.0, "d2": 1.0}}


def test_dense_run_retrieves_k_plus_one_and_drops_self_hits():
    emb = clustered(50, 16, 5, seed=0)
    ids = [f"id{i}" for i in range(50)]
    index = retrieval.build_index(emb)
    run = retrieval.dense_run(ids[:10], emb[:10], ids, index, k=5)
    kept = retrieval.dense_run(ids[:10], emb[:10], ids, index, k=5, drop_self=False)
    for qid in ids[:10]:
        assert len(run[qid]) == 5 and qid not in run[qid]
        assert ir.rank_documents(kept[qid])[0] == qid  # the query itself would be the top hit
        assert ir.rank_documents(run[qid]) == [d for d in ir.rank_documents(
            retrieval.dense_run([qid], emb[ids.index(qid)][None], ids, index, 6, drop_self=False)[qid]) if d != qid][:5]


# --------------------------------------------------------------------------------------------- run files
def test_run_file_round_trip_gives_identical_metrics(tmp_path):
    qrels, run = random_qrels_and_run(3)
    run["q1"] = {"d1": 0.1 + 0.2, "d2": 0.3, "d3": 1 / 3}  # 0.30000000000000004 vs 0.3 must not tie
    path = tmp_path / "sub" / "run.trec"
    ir.write_trec_run(str(path), run, tag="test")
    back = ir.read_trec_run(str(path))
    assert back == {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()}
    assert ir.evaluate_run(qrels, back, **KS) == ir.evaluate_run(qrels, run, **KS)
    assert [p.name for p in path.parent.iterdir()] == ["run.trec"]  # no temporary file left behind


def test_run_file_rows_follow_the_ranking_rule(tmp_path):
    path = tmp_path / "run.trec"
    ir.write_trec_run(str(path), {"q": {"a": 1.0, "b": 1.0, "c": 2.0}}, tag="t")
    assert path.read_text().splitlines() == ["q Q0 c 1 2.0 t", "q Q0 b 2 1.0 t", "q Q0 a 3 1.0 t"]


def test_writing_numpy_float32_scores_writes_plain_numbers(tmp_path):
    path = tmp_path / "run.trec"
    ir.write_trec_run(str(path), {"q": {"a": np.float32(0.5)}}, tag="t")
    assert path.read_text() == "q Q0 a 1 0.5 t\n"


@pytest.mark.parametrize("bad_line, message", [
    ("q1 Q0 d2 2 notanumber tag", "not a number"),
    ("q1 Q0 d2 2 0.5", "expected 6 fields"),
    ("q1 Q0 d1 2 0.5 tag", "appears twice"),
    ("q1 Q0 d2 2 nan tag", "NaN"),
])
def test_malformed_run_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.trec"
    path.write_text(f"q1 Q0 d1 1 1.0 tag\n\n{bad_line}\n")
    with pytest.raises(ir.EvalError, match=re.escape(f"{path}:3") + ".*" + message):
        ir.read_trec_run(str(path))


def test_writing_id_with_whitespace_is_rejected(tmp_path):
    with pytest.raises(ir.EvalError, match="whitespace"):
        ir.write_trec_run(str(tmp_path / "r"), {"q": {"a b": 1.0}}, tag="t")


# --------------------------------------------------------------------------------------------- faiss
def test_flat_search_is_exact_inner_product_in_batches():
    docs, queries = clustered(300, 32, 10, seed=1), clustered(25, 32, 10, seed=2)
    scores, indices = retrieval.search(retrieval.build_index(docs), queries, k=7, batch_size=4)
    expected = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :7]
    assert np.array_equal(np.sort(indices, axis=1), np.sort(expected, axis=1))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ docs.T, indices, axis=1), atol=1e-5)


def test_search_beyond_index_size_pads_with_minus_one_and_dense_run_skips_them():
    docs = clustered(3, 8, 1, seed=0)
    _, indices = retrieval.search(retrieval.build_index(docs), docs[:1], k=5)
    assert (indices[0, 3:] == -1).all()
    run = retrieval.dense_run(["q"], docs[:1], ["a", "b", "c"], retrieval.build_index(docs), k=5)
    assert sorted(run["q"]) == ["a", "b", "c"]


def low_rank(n, d, rank, seed, basis_seed=0, noise=0.05):
    """Normalised vectors near a random rank-`rank` subspace: the low intrinsic dimension of real embeddings."""
    basis = np.random.default_rng(basis_seed).standard_normal((rank, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rank)).astype(np.float32) @ basis
    x += noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def one_faiss_thread():
    """Index building on these small sets is fastest single-threaded; OpenMP threads on a busy machine (other
    test processes) make faiss's k-means many times slower."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _recall_vs_flat(kind, params, k=10):
    """(k-recall@k, 1-recall@k) of an approximate index against IndexFlatIP: the share of the exact top k found
    in the approximate top k, and the share of queries whose exact top 1 is in the approximate top k."""
    docs, queries = low_rank(5000, 64, 8, seed=1), low_rank(200, 64, 8, seed=2)
    _, exact = retrieval.search(retrieval.build_index(docs), queries, k)
    _, approx = retrieval.search(retrieval.build_index(docs, kind, **params), queries, k)
    return (np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]),
            np.mean([e[0] in a for a, e in zip(approx, exact)]))


def test_hnsw_neighbours_agree_with_flat(one_faiss_thread):
    recall, top1 = _recall_vs_flat("hnsw", dict(M=16, ef_construction=80, ef_search=64))
    assert recall >= 0.95 and top1 >= 0.99


def test_ivfpq_neighbours_agree_with_flat(one_faiss_thread):
    # PQ scores are approximate (64 dims in 32 codes of 6 bits), so the exact top 10 is only partly recovered,
    # but the true nearest neighbour is almost always among the 10 returned.
    recall, top1 = _recall_vs_flat("ivfpq", dict(nlist=32, m=32, nbits=6, nprobe=8))
    assert recall >= 0.75 and top1 >= 0.97


def test_unknown_index_parameter_is_rejected():
    with pytest.raises(ir.EvalError, match="unknown parameters"):
        retrieval.build_index(clustered(10, 8, 2, seed=0), "hnsw", efsearch=10)


# --------------------------------------------------------------------------------------------- pipeline
CORPUS = {
    "d1": "the cat sat on the mat",
    "d2": "dogs chase cats in the park every morning",
    "d3": "stock markets fell sharply on monday",
    "d4": "a recipe for apple pie with cinnamon",
    "d5": "the apple company released a new phone",
}
QUERIES = {"q_cat": "cat mat", "q_market": "stock markets monday", "q_apple": "apple pie recipe"}


def test_encode_corpus_batches_by_length_and_returns_original_order():
    enc = HashingEncoder()
    ids, texts = list(CORPUS), list(CORPUS.values())
    emb = retrieval.encode_corpus(enc, ids, texts, batch_size=2, progress=False)
    np.testing.assert_array_equal(emb, np.stack([enc._vec(t) for t in texts]))
    batches = [t for kind, b in enc.calls for t in b]
    assert [len(t) for t in batches] == sorted((len(t) for t in texts), reverse=True)
    assert [len(b) for _, b in enc.calls] == [2, 2, 1]


def test_retrieve_ranks_the_word_overlap_document_first():
    run = retrieval.retrieve(HashingEncoder(), QUERIES, CORPUS, k=3, batch_size=2, progress=False)
    assert {q: ir.rank_documents(docs)[0] for q, docs in run.items()} == {"q_cat": "d1", "q_market": "d3",
                                                                           "q_apple": "d4"}
    assert all(len(docs) == 3 for docs in run.values())


def test_rerank_reorders_top_k_and_keeps_the_rest_below_in_order():
    first = {"q_apple": {"d5": 5.0, "d1": 4.0, "d4": 3.0, "d3": 2.0, "d2": 1.0}}
    out = retrieval.rerank(HashingEncoder(), QUERIES, CORPUS, first, k=3, progress=False)["q_apple"]
    # Top 3 (d5, d1, d4) rescored: d4 shares 3 words, d5 1, d1 0; d3, d2 stay below in first-stage order.
    assert ir.rank_documents(out) == ["d4", "d5", "d1", "d3", "d2"]
    reranked_min = min(out["d4"], out["d5"], out["d1"])
    assert out["d3"] == reranked_min - 1 and out["d2"] == reranked_min - 2


def test_two_stage_returns_dense_and_reranked_runs():
    qrels = {"q_apple": {"d4": 1}, "q_cat": {"d1": 1}}
    dense, reranked = retrieval.two_stage(HashingEncoder(), QUERIES, CORPUS, k_retrieve=4, k_rerank=2, progress=False)
    assert set(dense) == set(reranked) == set(QUERIES)
    assert all(set(dense[q]) == set(reranked[q]) for q in QUERIES)
    assert ir.evaluate_run(qrels, reranked)["mrr@10"] == 1.0
