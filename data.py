"""Data: BEIR folders, training files, the deterministic sampler, hard-negative mining and atomic directories.
The prompt templates are config.py's (the data section's defaults), the synthetic task synthetic.py's.

Reading order:
  BEIR loaders  ->  training files (JSONL, MS MARCO triples)  ->  TrainSampler (exact resume from the step alone)
  ->  hard-negative mining (from embeddings, or from a TREC run evaluate.py wrote)  ->  build_dir_atomically  ->
  CLI (`python data.py mine RUN.trec BEIR_DIR OUT.jsonl`).

Every reader validates as it goes and raises ONE `DataError` naming `file:line` at the first problem, so a bad
line is found by reading the message, not by a KeyError deep inside training. Blank lines are skipped.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, NamedTuple, Sequence

import faiss
import numpy as np

from ir import rank_documents, read_trec_run, write_text_atomic
from model import ArgumentParser, run_cli

# --------------------------------------------------------------------------------------------- errors, readers
class DataError(ValueError):
    """A missing or malformed data file; the message starts with `path` or `path:line`."""


def _lines(path: str):
    """Yield (line_number, line without its newline) for the non-blank lines of a UTF-8 text file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def _jsonl(path: str):
    """Yield (line_number, object) for each line of a JSONL file whose lines are JSON objects."""
    for lineno, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _beir_id(obj: dict, where: str) -> str:
    """BEIR ids are strings; integer ids (some corpora have them) are turned into strings so they match qrels."""
    if "_id" not in obj:
        raise DataError(f"{where}: missing \"_id\"")
    i = obj["_id"]
    if isinstance(i, bool) or not isinstance(i, (str, int)) or i == "":
        raise DataError(f"{where}: \"_id\" must be a non-empty string, got {i!r}")
    return str(i)


def _str_field(obj: dict, key: str, where: str, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing \"{key}\"")
        return ""
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: \"{key}\" must be a string, got {type(v).__name__}")
    return v


# --------------------------------------------------------------------------------------------- BEIR folders
def _load_by_id(path: str, value) -> dict:
    """{_id: value(obj, where)} over a BEIR JSONL file; a repeated _id is an error naming both lines."""
    out, first_line = {}, {}
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        key = _beir_id(obj, where)
        if key in out:
            raise DataError(f"{where}: duplicate _id {key!r} (first at line {first_line[key]})")
        out[key] = value(obj, where)
        first_line[key] = lineno
    return out


def load_corpus(data_dir: str) -> dict:
    """<data_dir>/corpus.jsonl -> {doc_id: {"title": str, "text": str}}; "title" may be absent (-> "")."""
    return _load_by_id(os.path.join(data_dir, "corpus.jsonl"), lambda obj, where: {
        "title": _str_field(obj, "title", where, required=False), "text": _str_field(obj, "text", where)})


def load_queries(data_dir: str) -> dict:
    """<data_dir>/queries.jsonl -> {query_id: text} (other fields, e.g. BEIR's "metadata", are ignored)."""
    return _load_by_id(os.path.join(data_dir, "queries.jsonl"), lambda obj, where: _str_field(obj, "text", where))


QRELS_HEADER = ["query-id", "corpus-id", "score"]


def load_qrels(data_dir: str, split: str) -> dict:
    """<data_dir>/qrels/<split>.tsv -> {query_id: {doc_id: int score}}.

    Tab-separated `query-id corpus-id score`; the first line is skipped when it is that header (BEIR writes it).
    A (query, doc) pair listed twice is an error. Relevant means score > 0; score 0 is a judged non-relevant.
    """
    path = os.path.join(data_dir, "qrels", f"{split}.tsv")
    qrels = {}
    for lineno, line in _lines(path):
        cols = line.split("\t")
        if lineno == 1 and cols == QRELS_HEADER:
            continue
        where = f"{path}:{lineno}"
        if len(cols) != 3:
            raise DataError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                            f"got {len(cols)}")
        qid, doc_id, score = cols
        if not qid or not doc_id:
            raise DataError(f"{where}: empty query-id or corpus-id")
        try:
            score = int(score)
        except ValueError:
            raise DataError(f"{where}: score must be an integer, got {score!r}") from None
        if doc_id in qrels.setdefault(qid, {}):
            raise DataError(f"{where}: duplicate judgement for query {qid!r}, doc {doc_id!r}")
        qrels[qid][doc_id] = score
    return qrels


def load_qa(path: str) -> list:
    """A QA file (rag.py's input), one {"id": str, "question": str, "answers": [str, ...]} per line (the NQ-open /
    TriviaQA layout) -> those dicts in file order. An integer id becomes a string, other keys are ignored; the
    question and every answer must be non-empty strings, the answers a non-empty list; a repeated id is an error
    naming both lines."""
    out, first_line = [], {}
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("id", "question", "answers"):
            if key not in obj:
                raise DataError(f"{where}: missing \"{key}\"")
        i = obj["id"]
        if isinstance(i, bool) or not isinstance(i, (str, int)) or i == "":
            raise DataError(f"{where}: \"id\" must be a non-empty string, got {i!r}")
        i = str(i)
        if i in first_line:
            raise DataError(f"{where}: duplicate id {i!r} (first at line {first_line[i]})")
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise DataError(f"{where}: \"question\" must be a non-empty string")
        answers = obj["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{where}: \"answers\" must be a non-empty list of non-empty strings, got {answers!r}")
        first_line[i] = lineno
        out.append({"id": i, "question": obj["question"], "answers": list(answers)})
    if not out:
        raise DataError(f"{path}: no QA example (the file is empty)")
    return out


def doc_text(doc: dict) -> str:
    """A BEIR document as one string, the way BEIR and sentence-transformers do: (title + " " + text).strip()."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


# --------------------------------------------------------------------------------------------- training files
# One training example, for both tasks (embedding InfoNCE, reranker BCE / group softmax):
#   {"query": str, "pos": [str, ...] (non-empty), "neg": [str, ...] (may be empty, hardest first by convention)}
# Optional graded labels "pos_scores" / "neg_scores" (numbers, one per passage) are validated and kept.
# Any other key (FlagEmbedding's "prompt"/"type", ids, ...) is ignored and dropped, so every returned example has
# this fixed layout; a misspelt required key ("negs") is still caught because "neg" is then missing.
def _check_example(ex, where: str) -> dict:
    if not isinstance(ex, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    for key in ("query", "pos", "neg"):
        if key not in ex:
            raise DataError(f"{where}: missing \"{key}\"")
    if not isinstance(ex["query"], str) or not ex["query"].strip():
        raise DataError(f"{where}: \"query\" must be a non-empty string")
    out = {"query": ex["query"]}
    for key in ("pos", "neg"):
        v = ex[key]
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise DataError(f"{where}: \"{key}\" must be a list of non-empty strings")
        out[key] = v
    if not out["pos"]:
        raise DataError(f"{where}: \"pos\" must not be empty")
    for key, texts in (("pos_scores", "pos"), ("neg_scores", "neg")):
        if key in ex:
            v = ex[key]
            if not isinstance(v, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                  for s in v):
                raise DataError(f"{where}: \"{key}\" must be a list of numbers")
            if len(v) != len(out[texts]):
                raise DataError(f"{where}: \"{key}\" has {len(v)} entries but \"{texts}\" has {len(out[texts])}")
            out[key] = v
    return out


def read_train_jsonl(path: str) -> list:
    """Training examples from a JSONL file (layout above), validated line by line."""
    return [_check_example(obj, f"{path}:{lineno}") for lineno, obj in _jsonl(path)]


def read_triples_tsv(path: str) -> list:
    """MS MARCO triples (`query<TAB>positive<TAB>negative` per line) -> training examples.

    Lines with the same (query, positive) merge into one example whose "neg" lists their negatives in file order
    (duplicates dropped), so a query that appears with many negatives gives one example with n_neg choices.
    """
    groups = {}
    for lineno, line in _lines(path):
        cols = line.split("\t")
        where = f"{path}:{lineno}"
        if len(cols) != 3:
            raise DataError(f"{where}: expected 3 tab-separated columns (query, positive, negative), got {len(cols)}")
        if not all(c.strip() for c in cols):
            raise DataError(f"{where}: empty column")
        query, pos, neg = cols
        negs = groups.setdefault((query, pos), [])
        if neg not in negs:
            negs.append(neg)
    return [{"query": q, "pos": [p], "neg": negs} for (q, p), negs in groups.items()]


def write_train_jsonl(path: str, examples: Sequence[dict]) -> None:
    """Validate and write examples as JSONL (UTF-8, one object per line), atomically."""
    lines = [json.dumps(_check_example(ex, f"example {i}"), ensure_ascii=False) + "\n"
             for i, ex in enumerate(examples)]
    write_text_atomic(path, "".join(lines))


# --------------------------------------------------------------------------------------------- sampler
class Pick(NamedTuple):
    """One training item: examples[example] with positive pos[pos] and negatives neg[i] for i in negs."""
    example: int
    pos: int
    negs: tuple


class TrainSampler:
    """Which examples and passages form global step `step`, as a pure function of (seed, step).

    Epoch e = step // steps_per_epoch visits the examples in the order np.random.default_rng([seed, e])
    .permutation(n); step j of the epoch takes positions [j*B, (j+1)*B) of it (B = global batch_size; the last
    n % B examples of each permutation are skipped, so every batch is full). For each picked example the
    positive and the n_neg negatives are drawn with default_rng([seed, e, example]), so they do not depend on
    the batch size or on the number of ranks. Negatives are sampled without replacement and kept in file order
    (hardest first); an example with fewer than n_neg negatives uses all of them, then repeats (shuffled).

    Data position state = step: resuming at step k needs nothing but k (no iterator state to save), given the
    same examples, seed, batch_size, n_neg and numpy version (numpy does not promise streams across versions).
    Under DDP, rank r of world_size takes the contiguous slice [r*B/W, (r+1)*B/W) of the global batch, so the
    union over ranks is exactly the single-process batch.
    """

    def __init__(self, examples: Sequence[dict], batch_size: int, n_neg: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or n_neg < 0:
            raise ValueError(f"need batch_size >= 1 and n_neg >= 0, got {batch_size}, {n_neg}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} must split evenly over world_size {world_size} "
                             f"(rank {rank})")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size}")
        self.n_pos = [len(ex["pos"]) for ex in examples]
        self.n_negs = [len(ex["neg"]) for ex in examples]
        if n_neg > 0:
            for i, k in enumerate(self.n_negs):
                if k == 0:
                    raise DataError(f"example {i} has no negatives but n_neg={n_neg} were asked for")
        self.batch_size, self.n_neg, self.seed = batch_size, n_neg, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(examples) // batch_size
        self._perm_epoch, self._perm = None, None  # cache of the current epoch's permutation

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.n_pos))
            self._perm_epoch = epoch
        return self._perm

    def _pick(self, epoch: int, i: int) -> Pick:
        rng = np.random.default_rng([self.seed, epoch, i])
        pos = int(rng.integers(self.n_pos[i]))
        k = self.n_negs[i]
        if self.n_neg <= k:
            negs = sorted(rng.choice(k, size=self.n_neg, replace=False).tolist())
        else:
            order = list(range(k))
            while len(order) < self.n_neg:
                order += rng.permutation(k).tolist()
            negs = order[: self.n_neg]
        return Pick(int(i), pos, tuple(negs))

    def global_batch(self, step: int) -> list:
        """All B picks of global step `step` (what a single process trains on)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, j = divmod(step, self.steps_per_epoch)
        idx = self._permutation(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
        return [self._pick(epoch, i) for i in idx]

    def batch(self, step: int) -> list:
        """This rank's picks of global step `step`."""
        per_rank = self.batch_size // self.world_size
        return self.global_batch(step)[self.rank * per_rank:(self.rank + 1) * per_rank]


def gather_texts(examples: Sequence[dict], picks: Sequence[Pick]) -> dict:
    """Picks -> {"query": [B], "pos": [B], "neg": [B * n_neg]} texts; "neg" is grouped per query, in pick order."""
    return {"query": [examples[p.example]["query"] for p in picks],
            "pos": [examples[p.example]["pos"][p.pos] for p in picks],
            "neg": [examples[p.example]["neg"][n] for p in picks for n in p.negs]}


# --------------------------------------------------------------------------------------------- mining
def mine_hard_negatives(query_ids: Sequence[str], queries: Sequence[str], doc_ids: Sequence[str],
                        doc_texts: Sequence[str], qrels: dict, query_emb: np.ndarray, doc_emb: np.ndarray,
                        rank_window: tuple = (10, 100), n_neg: int = 8, seed: int = 0) -> list:
    """Hard negatives from a model's own ranking -> training examples (the model-independent part of mining).

    queries[i] is the text of query_ids[i] and the row query_emb[i]; likewise doc_texts[j], doc_ids[j],
    doc_emb[j]. Documents are ranked by inner product (faiss IndexFlatIP on the vectors as given: normalise them
    first for cosine). rank_window = (lo, hi) are 0-based ranks of the full ranking, positives included in the
    counting (as FlagEmbedding's range_for_sampling); positives (qrels score > 0) inside it are dropped and
    n_neg of the rest are drawn without replacement (fewer if the window has fewer), listed in rank order.
    Positives are the qrels docs with score > 0 that are in doc_ids, highest score first; queries with none
    are skipped. Deterministic: one np.random.default_rng(seed) consumed in query order.
    """
    lo, hi = rank_window
    if not 0 <= lo < hi:
        raise ValueError(f"rank_window must be (lo, hi) with 0 <= lo < hi, got {rank_window}")
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    doc_emb = np.ascontiguousarray(doc_emb, dtype=np.float32)
    if not (len(query_ids) == len(queries) == query_emb.shape[0]):
        raise ValueError(f"query_ids, queries, query_emb rows differ: {len(query_ids)}, {len(queries)}, "
                         f"{query_emb.shape[0]}")
    if not (len(doc_ids) == len(doc_texts) == doc_emb.shape[0]):
        raise ValueError(f"doc_ids, doc_texts, doc_emb rows differ: {len(doc_ids)}, {len(doc_texts)}, "
                         f"{doc_emb.shape[0]}")
    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(doc_emb)
    _, ranked = index.search(query_emb, min(hi, len(doc_ids)))
    return negatives_from_rankings(query_ids, queries, doc_ids, doc_texts, qrels, ranked.tolist(), rank_window,
                                   n_neg, seed)


def negatives_from_rankings(query_ids: Sequence[str], queries: Sequence[str], doc_ids: Sequence[str],
                            doc_texts: Sequence[str], qrels: dict, ranked: Sequence[list], rank_window: tuple,
                            n_neg: int, seed: int) -> list:
    """The sampling of mine_hard_negatives: ranked[i] lists query i's documents as rows of doc_ids, best first
    (-1 = no document). Positives inside the 0-based rank window are dropped, n_neg of the rest drawn without
    replacement (one np.random.default_rng(seed) in query order) and listed in rank order."""
    lo, hi = rank_window
    if not 0 <= lo < hi:
        raise ValueError(f"rank_window must be (lo, hi) with 0 <= lo < hi, got {rank_window}")
    row_of = {d: j for j, d in enumerate(doc_ids)}
    rng = np.random.default_rng(seed)
    out = []
    for qi, qid in enumerate(query_ids):
        judged = qrels.get(qid, {})
        positives = sorted((d for d, s in judged.items() if s > 0 and d in row_of), key=lambda d: -judged[d])
        if not positives:
            continue
        window = [j for j in ranked[qi][lo:hi] if j >= 0 and judged.get(doc_ids[j], 0) <= 0]
        chosen = sorted(rng.choice(len(window), size=min(n_neg, len(window)), replace=False).tolist())
        out.append({"query": queries[qi], "pos": [doc_texts[row_of[d]] for d in positives],
                    "neg": [doc_texts[window[t]] for t in chosen]})
    return out


def mine_from_run(run_path: str, beir_dir: str, split: str = "train", rank_window: tuple = (10, 100),
                  n_neg: int = 8, seed: int = 0) -> list:
    """Hard negatives from a model's ranking written as a TREC run (e.g. evaluate.py's run.retrieval.trec of
    `python evaluate.py CKPT --data BEIR_DIR --split train`), ranked by ir.rank_documents, sampled as
    negatives_from_rankings does. The split's judged queries absent from the run are skipped; a run document
    that is not in the corpus is a DataError."""
    if not os.path.isfile(run_path):
        raise DataError(f"{run_path}: run file not found")
    qrels = load_qrels(beir_dir, split)
    queries = load_queries(beir_dir)
    corpus = load_corpus(beir_dir)
    run = read_trec_run(run_path)
    qids = [q for q in sorted(qrels) if q in queries and q in run]
    doc_ids = list(corpus)
    row_of = {d: j for j, d in enumerate(doc_ids)}
    for q in qids:
        unknown = [d for d in run[q] if d not in row_of]
        if unknown:
            raise DataError(f"{run_path}: document {unknown[0]!r} (query {q!r}) is not in {beir_dir}/corpus.jsonl")
    ranked = [[row_of[d] for d in rank_documents(run[q])] for q in qids]
    return negatives_from_rankings(qids, [queries[q] for q in qids], doc_ids, [doc_text(corpus[d]) for d in doc_ids],
                                   qrels, ranked, rank_window, n_neg, seed)


# --------------------------------------------------------------------------------------------- atomic directories
def build_dir_atomically(final_path: str, write_fn: Callable[[str], None]) -> bool:
    """Create directory `final_path` so that it exists only complete: write_fn(tmp) fills a temporary sibling
    `.tmp-<name>-XXXXXX`, which is renamed to `final_path` when write_fn returns. -> True if this call built it.

    An existing non-empty final_path is complete by construction and is returned at once (False; an empty one is
    replaced). Builders of one path take
    turns on an exclusive flock of `.<name>.lock` beside it (released by the OS when a builder dies), so a second
    process waits, then finds the directory; holding the lock, a builder removes the temporaries of killed
    builders (never read). Where flock is not honoured, the rename decides: if final_path appeared meanwhile,
    that copy stands and this one is discarded. Files are fsynced before the rename.
    """
    final_path = os.path.abspath(final_path)
    if _nonempty_dir(final_path):
        return False
    parent, name = os.path.split(final_path)
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{name}.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # blocks while another process builds; freed on its death
        if _nonempty_dir(final_path):  # the other process finished while we waited
            return False
        for leftover in os.listdir(parent):  # a killed builder's partial copy
            if leftover.startswith(f".tmp-{name}-"):
                shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
        try:
            write_fn(tmp)
            _fsync_tree(tmp)
            try:
                os.rename(tmp, final_path)
            except OSError:
                if not _nonempty_dir(final_path):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else's rename won
                return False
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.filename is None and e.errno is not None:  # a full disk's write error names no file: name the dir
                raise OSError(e.errno, e.strerror, tmp) from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(parent)
    return True


def _nonempty_dir(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    parser = ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mine", help="hard negatives from a model's ranking (a TREC run) -> training JSONL")
    m.add_argument("run", help="TREC run file, e.g. <ckpt>/eval/<data>-train/run.retrieval.trec of "
                   "`python evaluate.py CKPT --data BEIR_DIR --split train`")
    m.add_argument("beir_dir")
    m.add_argument("out", help="training JSONL to write")
    m.add_argument("--split", default="train")
    m.add_argument("--window", type=int, nargs=2, default=(10, 100), metavar=("FROM", "TO"),
                   help="0-based rank window to sample from (positives are dropped)")
    m.add_argument("--n-neg", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for ok, what, got in ((0 <= args.window[0] < args.window[1], "--window FROM TO needs 0 <= FROM < TO",
                           args.window), (args.n_neg >= 1, "--n-neg must be >= 1", args.n_neg)):
        if not ok:
            got = " ".join(map(str, got)) if isinstance(got, (list, tuple)) else got
            raise DataError(f"mine: {what} (got {got})")
    examples = mine_from_run(args.run, args.beir_dir, args.split, tuple(args.window), args.n_neg, args.seed)
    write_train_jsonl(args.out, examples)
    print(json.dumps({"out": args.out, "examples": len(examples)}))


def cli(argv=None) -> int:
    """`python data.py ...` through the CLIs' one error path (model.run_cli): a missing or malformed file is one
    line naming it (file:line), exit code 2; `--debug` shows its traceback."""
    return run_cli("data.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
