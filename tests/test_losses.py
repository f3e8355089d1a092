"""The training losses (losses.py) as a spec: each equals its formula evaluated by hand (math.exp / math.log on
explicit numbers), and total_loss = alpha * L_emb + beta * L_rank + sum_n lambda_n * L_aux_n."""
import math

import pytest
import torch

import config
import losses


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def softplus(x):
    return math.log(1 + math.exp(x))


# Two queries, g = 2 documents each (query i's positive at row i * g = 0, 2; rows 1 and 3 are hard negatives).
Q = [[1.0, 0.0], [0.0, 1.0]]
D = [[1.0, 0.0],    # q0's positive
     [0.6, 0.8],    # q0's hard negative
     [0.0, 1.0],    # q1's positive
     [0.28, 0.96]]  # q1's hard negative
TEMPERATURE = 0.5


def info_nce_by_hand():
    # scores = q . d / T against ALL four documents (the other query's positive and negative are in-batch
    # negatives): q0 -> [1, .6, 0, .28] / .5, q1 -> [0, .8, 1, .96] / .5
    s0 = [2.0, 1.2, 0.0, 0.56]
    s1 = [0.0, 1.6, 2.0, 1.92]
    loss0 = -s0[0] + lse(s0)  # q0's label: row 0
    loss1 = -s1[2] + lse(s1)  # q1's label: row 1 * g = 2 (not row 1, its neighbour's hard negative)
    return (loss0 + loss1) / 2


def test_info_nce_equals_the_hand_computed_value():
    got = losses.info_nce_loss(torch.tensor(Q), torch.tensor(D), TEMPERATURE, cross_device=False)
    assert got.item() == pytest.approx(info_nce_by_hand(), abs=1e-6)


def test_info_nce_cross_device_without_a_process_group_is_the_plain_loss():
    # One process: nothing to gather and no world_size factor, whatever cross_device_negatives says.
    got = losses.info_nce_loss(torch.tensor(Q), torch.tensor(D), TEMPERATURE, cross_device=True)
    assert got.item() == pytest.approx(info_nce_by_hand(), abs=1e-6)
    assert losses.loss_world(True) == 1


SCORES = [2.0, -1.0, 0.5,   # group 0: positive 2.0, negatives -1.0, 0.5
          0.0, 1.0, 3.0]    # group 1: positive 0.0, negatives 1.0, 3.0
GROUP = 3


def bce_by_hand():
    # -log sigmoid(s) = softplus(-s) for a positive, -log(1 - sigmoid(s)) = softplus(s) for a negative
    return (softplus(-2.0) + softplus(-1.0) + softplus(0.5) + softplus(-0.0) + softplus(1.0) + softplus(3.0)) / 6


def group_ce_by_hand():
    # each group's softmax cross-entropy with its first entry as the target
    return ((-2.0 + lse([2.0, -1.0, 0.5])) + (-0.0 + lse([0.0, 1.0, 3.0]))) / 2


def test_bce_loss_equals_the_hand_computed_value():
    assert losses.bce_loss(torch.tensor(SCORES), GROUP).item() == pytest.approx(bce_by_hand(), abs=1e-6)


def test_group_ce_loss_equals_the_hand_computed_value():
    assert losses.group_ce_loss(torch.tensor(SCORES), GROUP).item() == pytest.approx(group_ce_by_hand(), abs=1e-6)


AUX = {"load_balance": 1.3, "z_loss": 2.0, "entropy": 0.7}


def outputs(with_q=True, with_scores=True):
    out = {"aux": {k: torch.tensor(v) for k, v in AUX.items()}}
    if with_q:
        out["q"], out["d"] = torch.tensor(Q), torch.tensor(D)
    if with_scores:
        out["scores"] = torch.tensor(SCORES)
    return out


def weighted_config(rerank_loss="bce"):
    cfg = config.Config()
    t = cfg.train
    t.temperature, t.emb_weight, t.rank_weight, t.rerank_loss = TEMPERATURE, 0.5, 2.0, rerank_loss
    t.aux_weights = {"load_balance": 0.1, "z_loss": 0.01}  # entropy is not listed: weight 0, logged anyway
    return cfg


def test_total_loss_is_the_weighted_sum_of_its_parts():
    loss, logged = losses.total_loss(outputs(), weighted_config(), GROUP)
    expected = 0.5 * info_nce_by_hand() + 2.0 * bce_by_hand() + 0.1 * 1.3 + 0.01 * 2.0 + 0.0 * 0.7
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Every part is logged unweighted, unlisted aux losses included.
    assert logged.keys() == {"emb", "rank", "load_balance", "z_loss", "entropy"}
    assert logged["emb"] == pytest.approx(info_nce_by_hand(), abs=1e-6)
    assert logged["rank"] == pytest.approx(bce_by_hand(), abs=1e-6)
    assert logged["entropy"] == pytest.approx(0.7)


def test_total_loss_uses_group_ce_when_configured():
    loss, logged = losses.total_loss(outputs(), weighted_config("group"), GROUP)
    assert logged["rank"] == pytest.approx(group_ce_by_hand(), abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * info_nce_by_hand() + 2.0 * group_ce_by_hand() + 0.13 + 0.02, abs=1e-6)


@pytest.mark.parametrize("with_q,with_scores", [(True, False), (False, True)], ids=["embed_only", "rerank_only"])
def test_total_loss_of_one_task_has_only_that_task_term(with_q, with_scores):
    loss, logged = losses.total_loss(outputs(with_q, with_scores), weighted_config(), GROUP)
    task = 0.5 * info_nce_by_hand() if with_q else 2.0 * bce_by_hand()
    assert loss.item() == pytest.approx(task + 0.13 + 0.02, abs=1e-6)
    assert ("emb" in logged) == with_q and ("rank" in logged) == with_scores


def test_task_losses_are_the_unweighted_task_losses_and_aux_terms():
    parts = losses.task_losses(outputs(), weighted_config(), GROUP)
    assert parts.keys() == {"emb", "rank", "load_balance", "z_loss", "entropy"}
    assert parts["emb"].item() == pytest.approx(info_nce_by_hand(), abs=1e-6)  # not times emb_weight 0.5
    assert parts["rank"].item() == pytest.approx(bce_by_hand(), abs=1e-6)  # not times rank_weight 2.0


def test_total_loss_with_task_weights_replaces_alpha_and_beta_but_not_the_aux_weights():
    # train.mtl's learned weights (mtl.py) come in as a function of the parts; the aux terms keep train.aux_weights.
    loss, logged = losses.total_loss(outputs(), weighted_config(), GROUP, lambda parts: {"emb": 0.25, "rank": 0.75})
    assert loss.item() == pytest.approx(0.25 * info_nce_by_hand() + 0.75 * bce_by_hand() + 0.13 + 0.02, abs=1e-6)
    assert logged["emb"] == pytest.approx(info_nce_by_hand(), abs=1e-6)
