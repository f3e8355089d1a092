"""QA answer metrics (ir.normalize_answer, exact_match, token_f1, qa_scores, has_answer) against hand-computed cases.

The rules, as the official SQuAD v1.1 evaluate script (evaluate-v1.1.py) applies them:
  normalize_answer: lowercase -> remove every character of Python's string.punctuation (ASCII only) -> replace the
    whole words a / an / the (regex \\b(a|an|the)\\b) by a space -> split on whitespace and join with one space.
  exact match: the normalised prediction equals the normalised gold answer.
  F1: over the normalised whitespace tokens; common = the size of the multiset intersection; if it is 0 the F1 is
    0 (also for two empty answers); else P = common / |prediction|, R = common / |gold|, F1 = 2PR / (P + R).
  several gold answers: each metric is its maximum over them (metric_max_over_ground_truths), separately.
Each expected value below is worked out by hand in its comment.
"""
import pytest

from ir import EvalError, exact_match, has_answer, normalize_answer, qa_scores, token_f1


@pytest.mark.parametrize("text, expected", [
    ("The Quick, brown FOX.", "quick brown fox"),  # lowercase, "the" dropped, ",", "." dropped
    ("  Theatre and   another\tman ", "theatre and another man"),  # articles only as whole words; whitespace
    ("The-End", "theend"),  # punctuation goes first: "the-end" -> "theend", no article left to drop
    ("'the' a.m.", "am"),  # quotes dropped -> "the am" -> "am"
    ("1990\u20132000 \u201cyes\u201d", "1990\u20132000 \u201cyes\u201d"),  # en dash, curly quotes: not ASCII
    ("A an THE", ""),  # articles only
])
def test_normalisation_follows_the_squad_steps_and_order(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_compares_normalised_strings():
    assert exact_match("The Denver Broncos!", "denver broncos") == 1.0
    assert exact_match("Denver Broncos", "Broncos") == 0.0
    assert exact_match("the", "An") == 1.0  # both normalise to ""


def test_f1_is_over_normalised_tokens_by_hand():
    # pred "the cat sat on the mat" -> cat sat on mat (4); gold "a cat on a mat" -> cat on mat (3); common 3:
    # P = 3/4, R = 1, F1 = 2 * 3/4 / (7/4) = 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # gold longer than the prediction: pred "broncos" (1), gold "denver broncos" (2): P = 1, R = 1/2, F1 = 2/3
    assert token_f1("Broncos", "Denver Broncos") == pytest.approx(2 / 3)


def test_f1_counts_repeated_tokens_as_a_multiset():
    # pred paris x3, gold paris x1: common = min(3, 1) = 1, P = 1/3, R = 1, F1 = (2/3) / (4/3) = 1/2
    assert token_f1("Paris paris PARIS", "Paris") == pytest.approx(0.5)


def test_f1_is_zero_without_common_tokens_even_for_two_empty_answers():
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "Paris") == 0.0
    # v1.1's rule: common = 0 -> 0, so "the" vs "a" (both empty after normalisation) has F1 0 while EM is 1
    assert token_f1("the", "a") == 0.0 and exact_match("the", "a") == 1.0


def test_each_metric_is_its_own_maximum_over_the_gold_answers():
    # pred "the broncos of denver" -> broncos of denver (3).
    # gold 1 "Denver Broncos" (2): common 2, P = 2/3, R = 1, F1 = (4/3) / (5/3) = 4/5; EM 0
    # gold 2 "Broncos of Denver city" (4): common 3, P = 1, R = 3/4, F1 = (3/2) / (7/4) = 6/7; EM 0
    # gold 3 "Broncos, of Denver!" normalises to the prediction: EM 1, F1 1
    pred = "the broncos of denver"
    assert qa_scores(pred, ["Denver Broncos"]) == {"em": 0.0, "f1": pytest.approx(4 / 5)}
    assert qa_scores(pred, ["Denver Broncos", "Broncos of Denver city"]) == {"em": 0.0, "f1": pytest.approx(6 / 7)}
    assert qa_scores(pred, ["Denver Broncos", "Broncos, of Denver!"]) == {"em": 1.0, "f1": 1.0}
    # EM and F1 maxima from different answers: "the" vs ["a", "the cat"]: EM 1 from "a" (both empty), F1 0 from
    # "a" (v1.1) and 0 from "the cat" (pred empty -> common 0)
    assert qa_scores("the", ["a", "the cat"]) == {"em": 1.0, "f1": 0.0}


@pytest.mark.parametrize("answers", [[], "Paris"], ids=["empty-list", "a-bare-string"])
def test_gold_answers_must_be_a_non_empty_list(answers):
    # A bare string would be iterated character by character: refuse it.
    with pytest.raises(EvalError, match="non-empty list of gold answers"):
        qa_scores("Paris", answers)


# --------------------------------------------------------------------------------------------- answer recall
@pytest.mark.parametrize("answers, expected", [
    (["Eiffel Tower"], True),       # "eiffel tower" is tokens 1-2 of "eiffel tower opened in 1889"
    (["the TOWER."], True),         # normalised to "tower": a one-token run
    (["tower opened in 1890"], False),  # a run of 4 tokens, but the last one differs
    (["Eiff"], False),              # a prefix of a token is not a token
    (["Lyon", "1889"], True),       # any gold answer may match
    (["opened tower"], False),      # the tokens, but not in this order
])
def test_has_answer_looks_for_the_normalised_answer_tokens_as_a_run(answers, expected):
    assert has_answer("The Eiffel Tower opened in 1889.", answers) is expected


def test_has_answer_reads_hyphens_as_squad_does():
    # punctuation is removed, not split on: "tova-ku" and "tovaku" both normalise to "tovaku"
    assert has_answer("a report on tova-ku data", ["tovaku"]) and not has_answer("tova ku", ["tova-ku"])
