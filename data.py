"""Data: prompt templates, BEIR folders, training files, the deterministic sampler, hard-negative mining, and
the built-in synthetic task behind the tiny default config.

Reading order:
  prompt templates (Qwen3-Embedding / Qwen3-Reranker strings)  ->  BEIR loaders  ->  training files (JSONL,
  MS MARCO triples)  ->  TrainSampler (exact resume from the step alone)  ->  mine_hard_negatives  ->
  build_dir_atomically  ->  make_synthetic  ->  CLI (`python data.py synthetic OUT_DIR [--seed N]`).

Every reader validates as it goes and raises ONE `DataError` naming `file:line` at the first problem, so a bad
line is found by reading the message, not by a KeyError deep inside training. Blank lines are skipped.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import sys
import tempfile
from typing import Callable, NamedTuple, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------- prompt templates
# Qwen3-Embedding: the query gets an instruction, documents are embedded as bare text.
EMBED_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# Qwen3-Reranker: the model reads prefix + pair + suffix and answers "yes" or "no" at the last position.
RERANK_INSTRUCTION = EMBED_INSTRUCTION
RERANK_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
                 "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
                 "<|im_start|>user\n")
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_query(query: str, instruction: str = EMBED_INSTRUCTION) -> str:
    """The embedding-side query text (Qwen3-Embedding's get_detailed_instruct; no space after "Query:")."""
    return f"Instruct: {instruction}\nQuery:{query}"


def format_rerank_pair(query: str, doc: str, instruction: str = RERANK_INSTRUCTION) -> str:
    """The reranker's middle part. The caller truncates its token ids and puts the ids of RERANK_PREFIX before
    and of RERANK_SUFFIX after, as Qwen3-Reranker does, so truncation never cuts the template."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


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


def _atomic_write_text(path: str, text: str) -> None:
    """Write to <path>.tmp then os.replace, so a crash never leaves a half-written file under `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_train_jsonl(path: str, examples: Sequence[dict]) -> None:
    """Validate and write examples as JSONL (UTF-8, one object per line), atomically."""
    lines = [json.dumps(_check_example(ex, f"example {i}"), ensure_ascii=False) + "\n"
             for i, ex in enumerate(examples)]
    _atomic_write_text(path, "".join(lines))


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
    import faiss  # imported here: only mining needs it

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
    row_of = {d: j for j, d in enumerate(doc_ids)}
    rng = np.random.default_rng(seed)
    out = []
    for qi, qid in enumerate(query_ids):
        judged = qrels.get(qid, {})
        positives = sorted((d for d, s in judged.items() if s > 0 and d in row_of), key=lambda d: -judged[d])
        if not positives:
            continue
        window = [j for j in ranked[qi, lo:hi].tolist() if j >= 0 and judged.get(doc_ids[j], 0) <= 0]
        chosen = sorted(rng.choice(len(window), size=min(n_neg, len(window)), replace=False).tolist())
        out.append({"query": queries[qi], "pos": [doc_texts[row_of[d]] for d in positives],
                    "neg": [doc_texts[window[t]] for t in chosen]})
    return out


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


# --------------------------------------------------------------------------------------------- synthetic task
# A retrieval task that word overlap cannot solve but a model can learn:
#   * concepts: n_concepts ideas, each written as one of n_forms made-up synonymous words ("tovami" / "ruke");
#   * a document states concepts_per_doc concepts, each in one of its forms, among filler words (15-27 words);
#     no two documents share a pair of concepts, so a pair of concepts identifies exactly one document;
#   * a query (4-7 words) names two concepts of its target document, each in a form the document does NOT use,
#     among query-only filler words, so the target shares no word with its query (BM25 nDCG@10 = 0);
#   * lexical traps: other documents that contain one of the query's concepts in the query's exact word.
# qrels: the target has score 2 and is the only judged document (partial matches are deliberately not labelled
# relevant: they are exactly the lexical traps, and rewarding them would reward overlap). Dev and test targets
# are documents never used as a training positive. train.jsonl negatives, hardest first: half (rounded up)
# lexical traps, then documents sharing one query concept in another form, topped up from the other tier and
# then from random documents; with random_negs = m the last m are random documents sharing no query concept
# (easy negatives next to the hard ones, as in-batch negatives are for a bi-encoder). lexicon.json lists each concept's forms (for oracle checks and reading).
# Defaults: 150 concepts x 2 forms (3 forms also works but a bag-of-words probe learns it about half as fast),
# 3 concepts per document. vocab_size is an upper bound: BPE stops once every word is one token (~1230).
DOC_FILLER = ("the a report notes that this record shows our team saw some new old data from near every with "
              "each then also its unit during after before under over field sample result value level stage "
              "group part was has had been").split()
QUERY_FILLER = "what which where find show me is are about does do how tell list any who".split()
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _made_up_words(rng: random.Random, n: int, reserved: set) -> list:
    words, seen = [], set(reserved)
    while len(words) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _doc_pairs(concepts: list) -> list:
    """The concept pairs of a document, each as a sorted tuple."""
    s = sorted(concepts)
    return [(a, b) for i, a in enumerate(s) for b in s[i + 1:]]


def _with_word(rng: random.Random, filler: list, word: str) -> list:
    """filler words with `word` inserted at a random position after the first, so that concept words always follow
    a space (byte-level BPE gives "word" and " word" different tokens; Qwen's query template has "Query:{query}")."""
    pos = rng.randint(1, len(filler))
    return filler[:pos] + [word] + filler[pos:]


def _train_tokenizer(texts: list, vocab_size: int):
    """A small byte-level BPE (Qwen's family of tokenizer: any text round-trips, no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def make_synthetic(out_dir: str, seed: int = 0, n_docs: int = 2000, n_train: int = 2000, n_dev: int = 200,
                   n_test: int = 200, n_concepts: int = 150, n_forms: int = 2, concepts_per_doc: int = 3,
                   same_form: int = 0, shared_stems: bool = True,
                   n_neg: int = 8, random_negs: int = 0, doc_filler: Sequence[int] = (4, 8),
                   vocab_size: int = 1536) -> dict:
    """Write the synthetic task (design above) to out_dir; same arguments -> byte-identical files.

    out_dir appears only complete (build_dir_atomically): a kill leaves at most a temporary sibling, removed by
    the next call; an existing out_dir is kept as it is.

    Files: corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv (disjoint query sets), train.jsonl,
    tokenizer.json + tokenizer_config.json, lexicon.json. Returns a small summary dict.
    """
    n_eval = n_dev + n_test
    pairs_per_doc = concepts_per_doc * (concepts_per_doc - 1) // 2
    if not 0 <= random_negs <= n_neg:
        raise ValueError(f"need 0 <= random_negs <= n_neg, got {random_negs}, {n_neg}")
    if len(doc_filler) != 2 or not 1 <= doc_filler[0] <= doc_filler[1] <= len(DOC_FILLER):
        raise ValueError(f"need doc_filler [lo, hi] with 1 <= lo <= hi <= {len(DOC_FILLER)}, got {doc_filler}")
    if n_forms < 2 or concepts_per_doc < 2:
        raise ValueError("need n_forms >= 2 (queries use another form) and concepts_per_doc >= 2")
    if n_docs * pairs_per_doc > 0.6 * n_concepts * (n_concepts - 1) / 2:
        raise ValueError(f"{n_concepts} concepts have too few pairs for {n_docs} documents; raise n_concepts")
    if n_eval >= n_docs or n_train > (n_docs - n_eval) * pairs_per_doc:
        raise ValueError(f"{n_docs} documents cannot hold {n_eval} dev/test and {n_train} train targets")
    rng = random.Random(seed)

    # Lexicon and documents. A doc is (concepts, forms); pair_owner enforces "a pair of concepts -> one doc".
    reserved = set(DOC_FILLER) | set(QUERY_FILLER) | {"yes", "no"}
    if shared_stems:  # a concept's forms are stem-suffix compounds ("tova-mi" / "tova-ku"): whole words differ,
        # subword tokens share the stem, so a model can learn the task quickly while word overlap cannot solve it
        stems = _made_up_words(rng, n_concepts, reserved)
        lexicon = [[f"{stem}-{suf}" for suf in rng.sample(_SYLLABLES, n_forms)] for stem in stems]
    else:  # unrelated made-up synonyms: much harder (needs many more steps)
        words = _made_up_words(rng, n_concepts * n_forms, reserved)
        lexicon = [words[c * n_forms:(c + 1) * n_forms] for c in range(n_concepts)]
    docs, pair_owner = [], {}
    while len(docs) < n_docs:
        concepts = rng.sample(range(n_concepts), concepts_per_doc)
        pairs = _doc_pairs(concepts)
        if any(p in pair_owner for p in pairs):
            continue
        for p in pairs:
            pair_owner[p] = len(docs)
        docs.append((concepts, [rng.randrange(n_forms) for _ in concepts]))
    doc_texts = []
    for concepts, forms in docs:
        words_ = []
        for c, f in zip(concepts, forms):
            words_ += _with_word(rng, rng.sample(DOC_FILLER, rng.randint(*doc_filler)), lexicon[c][f])
        doc_texts.append(" ".join(words_))
    with_concept = [[] for _ in range(n_concepts)]  # concept -> [(doc, form)]
    for d, (concepts, forms) in enumerate(docs):
        for c, f in zip(concepts, forms):
            with_concept[c].append((d, f))

    # Query targets: dev/test take distinct documents never used as a training positive; train cycles over the
    # remaining documents, taking an unused concept pair of the document each time round.
    order = list(range(n_docs))
    rng.shuffle(order)
    eval_docs, train_docs = order[:n_eval], order[n_eval:]
    used = {d: set() for d in train_docs}
    train_targets = []
    for i in range(n_train):
        d = train_docs[i % len(train_docs)]
        pair = rng.choice([p for p in _doc_pairs(docs[d][0]) if p not in used[d]])
        used[d].add(pair)
        train_targets.append((d, pair))
    targets = train_targets + [(d, rng.choice(_doc_pairs(docs[d][0]))) for d in eval_docs]  # train, dev, test

    queries, train_lines = [], []
    for qi, (d, pair) in enumerate(targets):
        concepts, forms = docs[d]
        # The first `same_form` concepts of the pair keep the target's own word (lexical overlap that also matches
        # the traps); the others are written with a synonym the target does not contain.
        qforms = {c: forms[concepts.index(c)] if j < same_form else
                  rng.choice([f for f in range(n_forms) if f != forms[concepts.index(c)]]) for j, c in enumerate(pair)}
        qwords = rng.sample(QUERY_FILLER, rng.randint(2, 5))
        first, second = rng.sample(pair, 2)
        qwords = _with_word(rng, qwords, lexicon[first][qforms[first]])
        qwords = _with_word(rng, qwords, lexicon[second][qforms[second]])
        queries.append(" ".join(qwords))
        if qi < n_train:
            traps = sorted({e for c in pair for e, f in with_concept[c] if f == qforms[c]} - {d})
            shared = sorted({e for c in pair for e, _ in with_concept[c]} - set(traps) - {d})
            rng.shuffle(traps)
            rng.shuffle(shared)
            n_hard = n_neg - random_negs
            k = min(len(traps), math.ceil(n_hard / 2))
            negs = traps[:k] + shared[: n_hard - k]
            negs += traps[k:k + n_hard - len(negs)]
            while len(negs) < n_hard:
                e = rng.randrange(n_docs)
                if e != d and e not in negs:
                    negs.append(e)
            related = set(traps) | set(shared)
            while len(negs) < n_neg:  # random_negs documents that share no concept with the query
                e = rng.randrange(n_docs)
                if e != d and e not in negs and e not in related:
                    negs.append(e)
            train_lines.append({"query": queries[-1], "pos": [doc_texts[d]], "neg": [doc_texts[e] for e in negs]})

    # Tokenizer, trained on everything the model will read, templates included (repeated so their words become
    # whole tokens: prompts stay short), and "yes"/"no" as standalone texts so each is a single token.
    templates = RERANK_PREFIX + format_rerank_pair("q", "d") + RERANK_SUFFIX + "\n" + format_query("q")
    for special in SPECIAL_TOKENS:  # special tokens are added whole, not learnt from text
        templates = templates.replace(special, "\n")
    tok = _train_tokenizer(doc_texts + queries + [templates] * 50 + ["yes", "no"] * 50, vocab_size)
    for word in ("yes", "no"):
        if tok.token_to_id(word) is None:
            raise RuntimeError(f"synthetic tokenizer: {word!r} is not a single token")

    # Files, into a temporary sibling renamed to out_dir when complete (an existing out_dir is kept).
    qid = [f"q{i:05d}" for i in range(len(targets))]
    did = [f"d{j:05d}" for j in range(n_docs)]
    splits = {"train": range(0, n_train), "dev": range(n_train, n_train + n_dev),
              "test": range(n_train + n_dev, n_train + n_eval)}

    def write(d: str) -> None:
        _atomic_write_text(os.path.join(d, "corpus.jsonl"), "".join(
            json.dumps({"_id": did[j], "title": "", "text": t}) + "\n" for j, t in enumerate(doc_texts)))
        _atomic_write_text(os.path.join(d, "queries.jsonl"), "".join(
            json.dumps({"_id": qid[i], "text": q}) + "\n" for i, q in enumerate(queries)))
        for split, rows in splits.items():
            _atomic_write_text(os.path.join(d, "qrels", f"{split}.tsv"), "\t".join(QRELS_HEADER) + "\n" + "".join(
                f"{qid[i]}\t{did[targets[i][0]]}\t2\n" for i in rows))
        write_train_jsonl(os.path.join(d, "train.jsonl"), train_lines)
        _atomic_write_text(os.path.join(d, "lexicon.json"), json.dumps({"concepts": lexicon}, indent=1) + "\n")
        _atomic_write_text(os.path.join(d, "tokenizer.json"), tok.to_str(pretty=True) + "\n")
        _atomic_write_text(os.path.join(d, "tokenizer_config.json"), json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2) + "\n")

    build_dir_atomically(out_dir, write)
    return {"out_dir": out_dir, "docs": n_docs, "train": n_train, "dev": n_dev, "test": n_test,
            "vocab_size": tok.get_vocab_size()}


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    from model import ArgumentParser  # the CLIs' parser (one-line errors); model is imported only by the CLI

    parser = ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synthetic", help="write the built-in synthetic task (BEIR folder + train.jsonl + tokenizer)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("mine", help="hard negatives from a trained checkpoint's own retrieval -> training JSONL")
    m.add_argument("ckpt", help="run or checkpoint directory written by train.py")
    m.add_argument("beir_dir")
    m.add_argument("out", help="training JSONL to write")
    m.add_argument("--split", default="train")
    m.add_argument("--window", type=int, nargs=2, default=(10, 100), metavar=("FROM", "TO"),
                   help="0-based rank window to sample from (positives are dropped)")
    m.add_argument("--n-neg", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "mine":
        for ok, what, got in ((0 <= args.window[0] < args.window[1], "--window FROM TO needs 0 <= FROM < TO",
                               args.window), (args.n_neg >= 1, "--n-neg must be >= 1", args.n_neg),
                              (args.batch_size >= 1, "--batch-size must be >= 1", args.batch_size)):
            if not ok:
                got = " ".join(map(str, got)) if isinstance(got, (list, tuple)) else got
                raise DataError(f"mine: {what} (got {got})")
    if args.command == "synthetic":
        summary = make_synthetic(args.out_dir, seed=args.seed)
        print(json.dumps(summary))
    elif args.command == "mine":
        mine(args)


def mine(args) -> None:
    """`python data.py mine CKPT BEIR_DIR OUT.jsonl`: embed the split's queries and the corpus with the checkpoint's
    embedding mode, search with faiss, drop positives, sample from the rank window, write the JSONL."""
    import train  # the model is rebuilt by train.py; imported here so data.py itself stays model-free

    um = train.load_run(args.ckpt)
    qrels = load_qrels(args.beir_dir, args.split)
    queries = load_queries(args.beir_dir)
    corpus = load_corpus(args.beir_dir)
    qids = [q for q in sorted(qrels) if q in queries]
    dids = list(corpus)
    texts = [doc_text(corpus[d]) for d in dids]
    q_emb = um.encode_queries([queries[q] for q in qids], args.batch_size)
    d_emb = um.encode_documents(texts, args.batch_size)
    examples = mine_hard_negatives(qids, [queries[q] for q in qids], dids, texts, qrels, q_emb, d_emb,
                                   tuple(args.window), args.n_neg, args.seed)
    write_train_jsonl(args.out, examples)
    print(json.dumps({"out": args.out, "examples": len(examples)}))


def cli(argv=None) -> int:
    """`python data.py ...` through the CLIs' one error path (model.run_cli): a missing or malformed file is one
    line naming it (file:line), exit code 2; `--debug` shows its traceback."""
    from model import run_cli

    return run_cli("data.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
