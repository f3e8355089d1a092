"""The built-in synthetic task behind the tiny default config: a BEIR folder + train.jsonl + a small BPE tokenizer
+ a QA file, written atomically, byte-identical for the same arguments.

    python synthetic.py OUT_DIR [--seed N]
    python synthetic.py OUT_DIR --qa      # (re)write OUT_DIR/qa.jsonl of an existing task (one written before it)
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from config import RERANK_PREFIX, RERANK_SUFFIX, format_query, format_rerank_pair
from data import QRELS_HEADER, DataError, build_dir_atomically, load_corpus, load_qrels, load_queries, \
    write_train_jsonl
from ir import write_text_atomic
from model import ArgumentParser, run_cli


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


def made_up_words(rng: random.Random, n: int, reserved: set) -> list:
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
    tokenizer.json + tokenizer_config.json, lexicon.json, and qa.jsonl (make_synthetic_qa, from the files before it
    only: they are what they were before qa.jsonl existed). Returns a small summary dict.
    """
    n_eval = n_dev + n_test
    _check_arguments(n_docs, n_train, n_eval, n_concepts, n_forms, concepts_per_doc, n_neg, random_negs, doc_filler)
    rng = random.Random(seed)  # one stream, consumed in the order of the steps below
    lexicon = _lexicon(rng, n_concepts, n_forms, shared_stems)
    docs, doc_texts = _documents(rng, lexicon, n_docs, concepts_per_doc, doc_filler)
    with_concept = [[] for _ in range(n_concepts)]  # concept -> [(doc, form)]
    for d, (concepts, forms) in enumerate(docs):
        for c, f in zip(concepts, forms):
            with_concept[c].append((d, f))
    targets = _targets(rng, docs, n_train, n_eval)
    queries, train_lines = [], []
    for qi, (d, pair) in enumerate(targets):
        text, qforms = _query(rng, docs[d], pair, lexicon, same_form)
        queries.append(text)
        if qi < n_train:
            negs = _negatives(rng, d, pair, qforms, with_concept, n_docs, n_neg, random_negs)
            train_lines.append({"query": text, "pos": [doc_texts[d]], "neg": [doc_texts[e] for e in negs]})
    tok = _task_tokenizer(doc_texts, queries, vocab_size)
    qid = [f"q{i:05d}" for i in range(len(targets))]
    did = [f"d{j:05d}" for j in range(n_docs)]
    splits = {"train": range(0, n_train), "dev": range(n_train, n_train + n_dev),
              "test": range(n_train + n_dev, n_train + n_eval)}
    qrels = {split: [(qid[i], did[targets[i][0]]) for i in rows] for split, rows in splits.items()}
    def write(tmp):
        _write_task(tmp, did, doc_texts, qid, queries, qrels, train_lines, lexicon, tok)
        make_synthetic_qa(tmp)

    build_dir_atomically(out_dir, write)
    return {"out_dir": out_dir, "docs": n_docs, "train": n_train, "dev": n_dev, "test": n_test,
            "vocab_size": tok.get_vocab_size()}


def _check_arguments(n_docs, n_train, n_eval, n_concepts, n_forms, concepts_per_doc, n_neg, random_negs,
                     doc_filler) -> None:
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


def _lexicon(rng: random.Random, n_concepts: int, n_forms: int, shared_stems: bool) -> list:
    """[concept][form] -> word."""
    reserved = set(DOC_FILLER) | set(QUERY_FILLER) | {"yes", "no"}
    if shared_stems:  # a concept's forms are stem-suffix compounds ("tova-mi" / "tova-ku"): whole words differ,
        # subword tokens share the stem, so a model can learn the task quickly while word overlap cannot solve it
        stems = made_up_words(rng, n_concepts, reserved)
        return [[f"{stem}-{suf}" for suf in rng.sample(_SYLLABLES, n_forms)] for stem in stems]
    words = made_up_words(rng, n_concepts * n_forms, reserved)  # unrelated made-up synonyms: much harder
    return [words[c * n_forms:(c + 1) * n_forms] for c in range(n_concepts)]


def _documents(rng: random.Random, lexicon: list, n_docs: int, concepts_per_doc: int, doc_filler: Sequence[int]
               ) -> tuple:
    """-> (docs [(concepts, forms)], their texts: each concept's word among doc_filler = [lo, hi] filler words).
    pair_owner enforces "a pair of concepts -> one doc"."""
    n_concepts, n_forms = len(lexicon), len(lexicon[0])
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
    return docs, doc_texts


def _targets(rng: random.Random, docs: list, n_train: int, n_eval: int) -> list:
    """[(doc, concept pair)] of the train, dev and test queries, in that order. Dev/test take distinct documents
    never used as a training positive; train cycles over the remaining documents, taking an unused concept pair of
    the document each time round."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    eval_docs, train_docs = order[:n_eval], order[n_eval:]
    used = {d: set() for d in train_docs}
    train_targets = []
    for i in range(n_train):
        d = train_docs[i % len(train_docs)]
        pair = rng.choice([p for p in _doc_pairs(docs[d][0]) if p not in used[d]])
        used[d].add(pair)
        train_targets.append((d, pair))
    return train_targets + [(d, rng.choice(_doc_pairs(docs[d][0]))) for d in eval_docs]


def _query(rng: random.Random, doc: tuple, pair: tuple, lexicon: list, same_form: int) -> tuple:
    """-> (query text, {concept: the form the query writes it in}). The first `same_form` concepts of the pair keep
    the target's own word (lexical overlap that also matches the traps); the others are written with a synonym the
    target does not contain."""
    concepts, forms = doc
    n_forms = len(lexicon[0])
    qforms = {c: forms[concepts.index(c)] if j < same_form else
              rng.choice([f for f in range(n_forms) if f != forms[concepts.index(c)]]) for j, c in enumerate(pair)}
    qwords = rng.sample(QUERY_FILLER, rng.randint(2, 5))
    first, second = rng.sample(pair, 2)
    qwords = _with_word(rng, qwords, lexicon[first][qforms[first]])
    qwords = _with_word(rng, qwords, lexicon[second][qforms[second]])
    return " ".join(qwords), qforms


def _negatives(rng: random.Random, d: int, pair: tuple, qforms: dict, with_concept: list, n_docs: int, n_neg: int,
               random_negs: int) -> list:
    """A training query's negative documents, hardest first (the tiers of the design above)."""
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
    return negs


def _task_tokenizer(doc_texts: list, queries: list, vocab_size: int):
    """Trained on everything the model will read, templates included (repeated so their words become whole tokens:
    prompts stay short), and "yes"/"no" as standalone texts so each is a single token."""
    templates = RERANK_PREFIX + format_rerank_pair("q", "d") + RERANK_SUFFIX + "\n" + format_query("q")
    for special in SPECIAL_TOKENS:  # special tokens are added whole, not learnt from text
        templates = templates.replace(special, "\n")
    tok = _train_tokenizer(doc_texts + queries + [templates] * 50 + ["yes", "no"] * 50, vocab_size)
    for word in ("yes", "no"):
        if tok.token_to_id(word) is None:
            raise RuntimeError(f"synthetic tokenizer: {word!r} is not a single token")
    return tok


def _write_task(d: str, did: list, doc_texts: list, qid: list, queries: list, qrels: dict, train_lines: list,
                lexicon: list, tok) -> None:
    """The task's files into directory d (build_dir_atomically's temporary)."""
    write_text_atomic(os.path.join(d, "corpus.jsonl"), "".join(
        json.dumps({"_id": did[j], "title": "", "text": t}) + "\n" for j, t in enumerate(doc_texts)))
    write_text_atomic(os.path.join(d, "queries.jsonl"), "".join(
        json.dumps({"_id": qid[i], "text": q}) + "\n" for i, q in enumerate(queries)))
    for split, rows in qrels.items():
        write_text_atomic(os.path.join(d, "qrels", f"{split}.tsv"), "\t".join(QRELS_HEADER) + "\n" + "".join(
            f"{q}\t{doc}\t2\n" for q, doc in rows))
    write_train_jsonl(os.path.join(d, "train.jsonl"), train_lines)
    write_text_atomic(os.path.join(d, "lexicon.json"), json.dumps({"concepts": lexicon}, indent=1) + "\n")
    write_text_atomic(os.path.join(d, "tokenizer.json"), tok.to_str(pretty=True) + "\n")
    write_text_atomic(os.path.join(d, "tokenizer_config.json"), json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- QA set
QA_FILE = "qa.jsonl"


def synthetic_qa(data_dir: str, split: str = "test") -> list:
    """The QA examples of a synthetic task's `split` (rag.py's format), a pure function of the task's files.

    Each judged query of qrels/<split>.tsv (sorted ids) becomes {"id": its query id, "question": its text
    verbatim (so retrieval is exactly that split's), "answers": ...}: the target document states 3 concepts
    (concepts_per_doc), the question names 2 of them (in other forms), and the answer is the concept it does not
    name, as the document writes it, then its other forms (any form is correct). A retriever that finds the target
    puts the answer word in the context; a reader then has to pick the one concept word the question lacks.
    With concepts_per_doc > 3 every unnamed concept's forms are answers (the document's forms first)."""
    with open(os.path.join(data_dir, "lexicon.json"), encoding="utf-8") as f:
        lexicon = json.load(f)["concepts"]
    concept_of = {w: c for c, forms in enumerate(lexicon) for w in forms}
    queries, corpus, qrels = load_queries(data_dir), load_corpus(data_dir), load_qrels(data_dir, split)
    out = []
    for q in sorted(qrels):
        targets = [d for d, g in qrels[q].items() if g > 0]
        if len(targets) != 1:
            raise DataError(f"{data_dir}/qrels/{split}.tsv: query {q!r} has {len(targets)} relevant documents; "
                            "a synthetic query has exactly one")
        named = {concept_of[w] for w in queries[q].split() if w in concept_of}
        doc_words = [w for w in corpus[targets[0]]["text"].split() if w in concept_of]
        answers = []
        for w in doc_words:
            if concept_of[w] not in named:
                answers += [w] + [f for f in lexicon[concept_of[w]] if f != w]
        out.append({"id": q, "question": queries[q], "answers": answers})
    return out


def make_synthetic_qa(data_dir: str, split: str = "test") -> str:
    """Write <data_dir>/qa.jsonl (synthetic_qa of `split`) atomically; -> its path."""
    path = os.path.join(data_dir, QA_FILE)
    write_text_atomic(path, "".join(json.dumps(ex) + "\n" for ex in synthetic_qa(data_dir, split)))
    return path


def main(argv=None) -> None:
    parser = ArgumentParser(prog="synthetic.py", description="write the built-in synthetic task (BEIR folder + "
                            "train.jsonl + tokenizer)")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qa", action="store_true", help="only (re)write OUT_DIR/qa.jsonl of the existing task")
    args = parser.parse_args(argv)
    if args.qa:
        if not os.path.isfile(os.path.join(args.out_dir, "lexicon.json")):
            raise DataError(f"{args.out_dir}: not a synthetic task (no lexicon.json)")
        print(json.dumps({"qa": make_synthetic_qa(args.out_dir)}))
        return
    print(json.dumps(make_synthetic(args.out_dir, seed=args.seed)))


def cli(argv=None) -> int:
    """`python synthetic.py OUT_DIR` through the CLIs' one error path (model.run_cli)."""
    return run_cli("synthetic.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
