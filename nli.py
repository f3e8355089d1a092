"""The added task's data (Experiment 8, extend.py): NLI pair classification files, the built-in synthetic NLI set,
and the deterministic batch order.

    {"premise": "...", "hypothesis": "...", "label": "entailment" | "neutral" | "contradiction", "id": "..."}

one JSON object per line (`id` optional). SNLI / MultiNLI's own JSONL (snli_1.0_train.jsonl, multinli_1.0_*.jsonl)
is read as it is: `sentence1` / `sentence2` / `gold_label` stand for premise / hypothesis / label (and `pairID` for
id), and their lines with gold_label "-" (no annotator majority) are skipped, as the datasets' papers do. Any other
malformed line (not JSON, a field missing or not a string, an unknown label) is one DataError naming the file and
line.

Reading order: reading (read_nli) -> the synthetic set (make_synthetic_nli) -> batches (batch_indices).
"""
from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter
from typing import Sequence

import numpy as np

from config import NLI_LABELS
from data import DataError, _jsonl, build_dir_atomically
from ir import write_text_atomic
from model import ArgumentParser, run_cli
from synthetic import made_up_words

SNLI_FIELDS = {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label", "id": "pairID"}
NO_MAJORITY = "-"  # SNLI / MultiNLI gold_label when the annotators had no majority: skipped


# --------------------------------------------------------------------------------------------- reading
def read_nli(path: str) -> list:
    """An NLI JSONL file -> [{"premise", "hypothesis", "label" (class index into config.NLI_LABELS), "id"}].
    SNLI / MultiNLI lines (sentence1 / sentence2 / gold_label) are accepted, their gold_label "-" skipped. An
    empty file (or one with only skipped lines) is an error too."""
    out = []
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        names = {k: k for k in SNLI_FIELDS} if "premise" in obj or "sentence1" not in obj else SNLI_FIELDS
        values = {}
        for key in ("premise", "hypothesis", "label"):
            field = names[key]
            if field not in obj:
                raise DataError(f"{where}: missing \"{field}\"")
            if not isinstance(obj[field], str):
                raise DataError(f"{where}: \"{field}\" must be a string, got {type(obj[field]).__name__}")
            values[key] = obj[field]
        if values["label"] == NO_MAJORITY and names is SNLI_FIELDS:
            continue
        if values["label"] not in NLI_LABELS:
            raise DataError(f"{where}: \"{names['label']}\" must be one of {', '.join(NLI_LABELS)} (got "
                            f"{values['label']!r})")
        ex_id = obj.get(names["id"], f"{os.path.basename(path)}:{lineno}")
        out.append({"premise": values["premise"], "hypothesis": values["hypothesis"],
                    "label": NLI_LABELS.index(values["label"]), "id": str(ex_id)})
    if not out:
        raise DataError(f"{path}: no NLI examples")
    return out


def majority_accuracy(train: Sequence[dict], dev: Sequence[dict]) -> float:
    """The accuracy on dev of always answering the training set's most frequent label (ties: the first label)."""
    counts = Counter(ex["label"] for ex in train)
    top = max(range(len(NLI_LABELS)), key=lambda c: (counts[c], -c))
    return sum(ex["label"] == top for ex in dev) / max(1, len(dev))


# --------------------------------------------------------------------------------------------- synthetic set
# A premise states two facts "<entity> is <value>" (two entities, two families) among filler words; each value
# belongs to a family of mutually
# exclusive values and is written in one of two synonymous forms. The hypothesis states one fact, and its label is
#   entailment:    a premise entity with its value, in the OTHER form (no word of the value repeats);
#   contradiction: a premise entity with another value of the same family (exclusive), in either form;
#   neutral:       an entity the premise does not name, with a premise value in its other form.
# So entity overlap separates neutral from the rest, and entailment from contradiction needs the synonym pairs,
# which only the training data teaches: the hypothesis's value word never occurs in its premise. Words are made of
# the synthetic retrieval task's syllables, so the tiny base's tokenizer reads them in a few tokens.
_FILLER = "the a report notes that this record shows our team saw some new old data".split()


def _words(rng: random.Random, n: int, seen: set) -> list:
    """n made-up words (synthetic.made_up_words: the retrieval task's syllables, so the tiny base's tokenizer reads
    them in a few tokens) not in `seen`, which then holds them too."""
    words = made_up_words(rng, n, seen)
    seen.update(words)
    return words


def synthetic_nli_examples(seed: int = 0, n_train: int = 3000, n_dev: int = 300, n_entities: int = 120,
                           n_families: int = 6, n_values: int = 4) -> tuple:
    """(train, dev) example lists of the synthetic set (design above): a pure function of the arguments, labels
    drawn uniformly. Dev premises use the same vocabulary, with fact pairs never seen in training."""
    if min(n_train, n_dev) < 1 or n_entities < 3 or n_families < 2 or n_values < 2:
        raise ValueError("make_synthetic_nli: need n_train, n_dev >= 1, n_entities >= 3, n_families >= 2, "
                         "n_values >= 2")
    rng = random.Random(seed)
    seen: set = set(_FILLER)
    entities = _words(rng, n_entities, seen)
    values = [[tuple(_words(rng, 2, seen)) for _ in range(n_values)] for _ in range(n_families)]  # [f][v] = 2 forms
    used, out = set(), []
    while len(out) < n_train + n_dev:
        e1, e2 = rng.sample(entities, 2)
        f1, f2 = rng.sample(range(n_families), 2)  # two families: no value word of the premise repeats elsewhere
        v1, v2 = rng.randrange(n_values), rng.randrange(n_values)
        key = (e1, f1, v1, e2, f2, v2)
        if key in used:
            continue
        used.add(key)
        forms = [rng.randrange(2), rng.randrange(2)]
        facts = [f"{e1} is {values[f1][v1][forms[0]]}", f"{e2} is {values[f2][v2][forms[1]]}"]
        filler = rng.sample(_FILLER, rng.randint(2, 5))
        premise = " ".join(filler[:len(filler) // 2] + [facts[0], "and"] + filler[len(filler) // 2:] + [facts[1]])
        label = rng.randrange(len(NLI_LABELS))
        k = rng.randrange(2)
        ent, fam, val, form = [(e1, f1, v1, forms[0]), (e2, f2, v2, forms[1])][k]
        if NLI_LABELS[label] == "entailment":
            hyp = f"{ent} is {values[fam][val][1 - form]}"
        elif NLI_LABELS[label] == "contradiction":
            other = rng.choice([v for v in range(n_values) if v != val])
            hyp = f"{ent} is {values[fam][other][rng.randrange(2)]}"
        else:
            stranger = rng.choice([e for e in entities if e not in (e1, e2)])
            hyp = f"{stranger} is {values[fam][val][1 - form]}"
        out.append({"premise": premise, "hypothesis": hyp, "label": NLI_LABELS[label]})
    for i, ex in enumerate(out):
        ex["id"] = f"{'train' if i < n_train else 'dev'}-{i:05d}"
    return out[:n_train], out[n_train:]


def make_synthetic_nli(out_dir: str, seed: int = 0, **kwargs) -> dict:
    """Write train.jsonl and dev.jsonl of the synthetic set into out_dir, atomically (data.build_dir_atomically:
    an existing out_dir is kept); same arguments -> byte-identical files."""
    train, dev = synthetic_nli_examples(seed, **kwargs)

    def write(tmp):
        for name, rows in (("train.jsonl", train), ("dev.jsonl", dev)):
            write_text_atomic(os.path.join(tmp, name), "".join(json.dumps(r) + "\n" for r in rows))

    build_dir_atomically(out_dir, write)
    return {"out_dir": out_dir, "train": len(train), "dev": len(dev)}


# --------------------------------------------------------------------------------------------- batches
def batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1) -> list:
    """The examples of global step `step`, as data.TrainSampler orders them: epoch e = step // (n // batch_size)
    visits np.random.default_rng([seed, e]).permutation(n) in consecutive batches (the last n % batch_size of each
    epoch skipped); rank r of `world` takes the r-th contiguous slice. A pure function of its arguments (resume)."""
    if n < batch_size:
        raise DataError(f"{n} NLI training examples cannot fill one batch of {batch_size}")
    epoch, j = divmod(step, n // batch_size)
    idx = np.random.default_rng([seed, epoch]).permutation(n)[j * batch_size:(j + 1) * batch_size]
    per = batch_size // world
    return [int(i) for i in idx[rank * per:(rank + 1) * per]]


def main(argv=None) -> None:
    p = ArgumentParser(prog="nli.py", description="write the built-in synthetic NLI set (train.jsonl, dev.jsonl)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(make_synthetic_nli(args.out_dir, seed=args.seed)))


def cli(argv=None) -> int:
    """`python nli.py OUT_DIR` through the CLIs' one error path (model.run_cli)."""
    return run_cli("nli.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
