"""Benchmark the evaluation side: faiss index kinds and corpus-encoding throughput.

Part 1, dense search (evaluate.build_index / evaluate.search): n_docs vectors of dimension dim, n_queries
queries, top-k. For flat (exact), HNSW and IVF-PQ it prints build time, search time, queries/s and recall@k
against the flat index, with ratios vs flat. --data lowrank (default) draws documents and queries near a
random 64-dimensional subspace plus noise, which is closer to real embeddings than i.i.d. Gaussian vectors;
--data gaussian gives the i.i.d. worst case for approximate search (neighbours are barely nearer than anyone).

Part 2, encoding (evaluate.encode_corpus): docs/s for each --encoder on a synthetic corpus (Zipfian words,
10-300 words per document), through the pipeline (length-sorted batches) and as one direct call in corpus
order, with ratios vs the first encoder. "bow" is a numpy random-projection bag-of-words encoder, the
baseline; make_encoder() is where the model's checkpoint encoder gets added.

    python benchmarks/bench_eval.py                      # ~2 minutes on 2 cores
    python benchmarks/bench_eval.py --n-docs 20000 --dim 256 --enc-docs 2000   # seconds
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import zlib

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev  # noqa: E402


# --------------------------------------------------------------------------------------------- encoders
class RandomProjectionBowEncoder:
    """Baseline encoder: words hashed into n_buckets, each bucket a fixed random Gaussian vector; a text is the
    L2-normalised sum of its words' vectors (a random projection of its bag of words). score_pairs is the
    cosine of the two vectors. Implements the interface documented in evaluate.py."""

    def __init__(self, dim: int = 1024, n_buckets: int = 1 << 14, seed: int = 0):
        self.projection = np.random.default_rng(seed).standard_normal((n_buckets, dim), dtype=np.float32)
        self.n_buckets = n_buckets

    def _encode(self, texts):
        ids = [[zlib.crc32(w.encode()) % self.n_buckets for w in re.findall(r"\w+", t.lower())] or [0] for t in texts]
        offsets = np.cumsum([0] + [len(i) for i in ids[:-1]])
        emb = np.add.reduceat(self.projection[np.concatenate(ids)], offsets, axis=0)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def encode_queries(self, texts, batch_size):
        return self._encode(texts)

    def encode_documents(self, texts, batch_size):
        return self._encode(texts)

    def score_pairs(self, queries, docs, batch_size):
        return np.sum(self._encode(queries) * self._encode(docs), axis=1)


def make_encoder(name: str, dim: int):
    """Encoder by name for the encoding benchmark.

    TODO(lead): add the UniMoER checkpoint encoder here (e.g. name = a checkpoint directory), returning an
    object with encode_queries / encode_documents / score_pairs as documented in evaluate.py.
    """
    if name == "bow":
        return RandomProjectionBowEncoder(dim=dim)
    raise SystemExit(f"unknown encoder {name!r} (supported: bow)")


# --------------------------------------------------------------------------------------------- data
def vectors(n: int, dim: int, kind: str, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    if kind == "gaussian":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        x = rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis
        noise = rng.standard_normal((n, dim), dtype=np.float32)
        x += 0.1 * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(dim) * noise  # noise norm ~ 10% of signal
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_corpus(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(30000)]
    lengths = rng.integers(10, 301, size=n)
    words = rng.zipf(1.2, size=int(lengths.sum())) % len(vocab)
    texts, pos = [], 0
    for length in lengths:
        texts.append(" ".join(vocab[w] for w in words[pos:pos + length]))
        pos += length
    return texts


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------- benchmarks
def bench_search(args) -> None:
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, args.dim), dtype=np.float32)
    docs = vectors(args.n_docs, args.dim, args.data, rng, basis)
    queries = vectors(args.n_queries, args.dim, args.data, rng, basis)
    print(f"== dense search: {args.n_docs} docs x dim {args.dim} ({args.data}), {args.n_queries} queries, "
          f"top-{args.k}, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    kinds = {
        "flat": {},
        "hnsw": dict(M=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search),
        "ivfpq": dict(nlist=args.nlist, m=args.pq_m, nbits=8, nprobe=args.nprobe),
    }
    rows, exact = [], None
    for kind in args.kinds.split(","):
        index, build = timed(lambda: ev.build_index(docs, kind, **kinds[kind]))
        (_, indices), search_s = timed(lambda: ev.search(index, queries, args.k))
        if kind == "flat":
            exact = indices
        recall = (np.mean([len(set(a) & set(e)) / args.k for a, e in zip(indices, exact)])
                  if exact is not None else float("nan"))
        params = ",".join(f"{k}={v}" for k, v in kinds[kind].items()) or "exact"
        rows.append((kind, params, build, search_s, recall))
        del index
    base = rows[0]
    print(f"{'index':<6} {'params':<40} {'build s':>8} {'search s':>9} {'q/s':>9} {'recall@' + str(args.k):>10}"
          f"   vs {base[0]}: {'build':>6} {'search speedup':>14}")
    for kind, params, build, search_s, recall in rows:
        print(f"{kind:<6} {params:<40} {build:8.2f} {search_s:9.3f} {args.n_queries / search_s:9.0f} {recall:10.3f}"
              f"       {build / base[2]:6.1f}x {base[3] / search_s:13.1f}x")


def bench_encode(args) -> None:
    texts = synthetic_corpus(args.enc_docs)
    doc_ids = [f"d{i}" for i in range(len(texts))]
    print(f"== corpus encoding: {len(texts)} synthetic docs (10-300 words, mean {np.mean([len(t) for t in texts]):.0f} "
          f"chars), batch size {args.batch_size}")
    rows = []
    for name in args.encoder.split(","):
        encoder = make_encoder(name, args.dim)
        encoder.encode_documents(texts[:args.batch_size], args.batch_size)  # warm-up
        _, pipeline = timed(lambda: ev.encode_corpus(encoder, doc_ids, texts, args.batch_size, progress=False))
        _, direct = timed(lambda: [encoder.encode_documents(texts[i:i + args.batch_size], args.batch_size)
                                   for i in range(0, len(texts), args.batch_size)])
        rows.append((name, len(texts) / pipeline, len(texts) / direct))
    print(f"{'encoder':<10} {'encode_corpus docs/s':>21} {'direct docs/s':>14} {'pipeline/direct':>16} "
          f"{'vs ' + rows[0][0]:>8}")
    for name, pipeline, direct in rows:
        print(f"{name:<10} {pipeline:21.0f} {direct:14.0f} {pipeline / direct:15.2f}x {pipeline / rows[0][1]:7.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-docs", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data", choices=("lowrank", "gaussian"), default="lowrank")
    p.add_argument("--kinds", default="flat,hnsw,ivfpq", help="comma-separated, flat first (the reference)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--pq-m", type=int, default=64, help="PQ sub-quantizers (must divide --dim)")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    p.add_argument("--encoder", default="bow",
                   help="comma-separated encoder names (see make_encoder); the first is the baseline of the ratios")
    p.add_argument("--enc-docs", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--skip-encode", action="store_true")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if not args.kinds.startswith("flat"):
        raise SystemExit("--kinds must start with flat (recall and ratios are relative to it)")
    if not args.skip_search:
        bench_search(args)
    if not args.skip_encode:
        bench_encode(args)


if __name__ == "__main__":
    main()
