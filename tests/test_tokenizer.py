"""Tokenizer / load_tokenizer as a spec: batch encoding, padding sides, the appended EOS, and finding it again.

The tokenizer is a tiny word-level tokenizer.json trained here with the `tokenizers` package. As in Qwen3, the
appended end token `<|endoftext|>` is also the pad token, which is what makes finding the last token subtle.
"""
import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from model import CheckpointError, last_token_positions, load_tokenizer

EOS = "<|endoftext|>"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a query asks and a document answers",
    "rerank the documents for the query",
    "embeddings map text to vectors",
]
TEXTS = ["the quick brown fox jumps over the lazy dog", "a query", "rerank the documents for the query"]


def write_tokenizer(d, post_eos=False):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=[EOS, "[UNK]"]))
    if post_eos:  # a tokenizer whose post-processor already appends the EOS
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": EOS, "eos_token": EOS}))
    return d


@pytest.fixture
def tok(tmp_path):
    return load_tokenizer(str(write_tokenizer(tmp_path / "tok")))


def real_ids(batch):
    """Per sequence, the ids under the mask (padding removed)."""
    return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def test_eos_is_the_pad_token(tok):
    # The premise of the tests below: pad id == EOS id, as in Qwen3.
    assert tok.eos_token == EOS
    assert tok.eos_id == tok.pad_id == tok.token_id(EOS)


def test_batch_encode_truncates_to_max_length(tok):
    full = tok(TEXTS, max_length=100)
    cut = tok(TEXTS, max_length=4)
    assert cut["input_ids"].shape == (3, 4)
    assert cut["input_ids"].dtype == cut["attention_mask"].dtype == torch.long
    for long, short in zip(real_ids(full), real_ids(cut)):
        assert short == long[:4]  # truncation keeps the head of the text


@pytest.mark.parametrize("add_eos", [False, True])
def test_left_and_right_padding_hold_the_same_tokens_and_mask_lengths(tok, add_eos):
    right = tok(TEXTS, max_length=6, padding_side="right", add_eos=add_eos)
    left = tok(TEXTS, max_length=6, padding_side="left", add_eos=add_eos)
    assert real_ids(left) == real_ids(right)
    assert left["attention_mask"].sum(1).tolist() == right["attention_mask"].sum(1).tolist()
    # Real tokens are one contiguous run, at the start (right padding) or at the end (left padding).
    for m in right["attention_mask"]:
        assert m.tolist() == sorted(m.tolist(), reverse=True)
    for m in left["attention_mask"]:
        assert m.tolist() == sorted(m.tolist())
    # Pads carry the pad id.
    for batch in (left, right):
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_id).all()


def test_add_eos_appends_exactly_one_eos(tok):
    plain = real_ids(tok(TEXTS, max_length=100))
    with_eos = real_ids(tok(TEXTS, max_length=100, add_eos=True))
    for p, e in zip(plain, with_eos):
        assert e == p + [tok.eos_id]


def test_add_eos_keeps_the_eos_as_last_token_after_truncation(tok):
    # Truncation must not cut the EOS off: the embedding / reranker score is read at that token.
    plain = real_ids(tok(TEXTS[:1], max_length=100))[0]
    ids = real_ids(tok(TEXTS[:1], max_length=5, add_eos=True))[0]
    assert ids == plain[:4] + [tok.eos_id]
    assert ids.count(tok.eos_id) == 1


def test_add_eos_does_not_double_an_eos_the_post_processor_appended(tmp_path):
    tok = load_tokenizer(str(write_tokenizer(tmp_path / "tok", post_eos=True)))
    assert tok(["a query"], max_length=100)["input_ids"][0].tolist()[-1] == tok.eos_id  # the processor adds one
    for max_length in (100, 2):
        ids = real_ids(tok(["a query"], max_length=max_length, add_eos=True))[0]
        assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_positions_find_the_eos_although_it_is_the_pad_id(tok, side):
    # Searching for the first pad id would stop at the EOS itself (right padding) or at the first pad (left
    # padding); the position must come from the mask.
    batch = tok(TEXTS, max_length=6, padding_side=side, add_eos=True)
    pos = last_token_positions(batch["attention_mask"])
    rows = torch.arange(len(TEXTS))
    assert (batch["input_ids"][rows, pos] == tok.eos_id).all()
    lengths = batch["attention_mask"].sum(1)
    T = batch["input_ids"].shape[1]
    expected = lengths - 1 if side == "right" else torch.full_like(lengths, T - 1)
    assert pos.tolist() == expected.tolist()
    assert (lengths < T).any()  # some rows really are padded


def test_missing_tokenizer_json_raises_naming_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "tokenizer.json")) + ".*not found"):
        load_tokenizer(str(tmp_path))
