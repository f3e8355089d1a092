"""analysis.py as a spec: the statistics on hand-made numbers (CKA, TIR, the paired bootstrap, gradient cosine,
principal angles, the expert spectra) and one end-to-end run of every subcommand on tiny runs built in a
temporary directory (tiny_setup.py)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import analysis
import measures
import evaluate
import ir
import moe_lora
import tiny_setup
import train


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


def random_matrix(n, p, seed):
    return np.random.default_rng(seed).standard_normal((n, p))


def orthogonal(p, seed):
    q, _ = np.linalg.qr(random_matrix(p, p, seed))
    return q


# --------------------------------------------------------------------------------------------- CKA
def test_cka_of_a_representation_with_itself_is_one():
    x = random_matrix(50, 8, seed=0)
    assert measures.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    # What makes CKA comparable across models: a rotated, rescaled copy of the same geometry is the same geometry.
    x, y = random_matrix(50, 8, seed=1), random_matrix(50, 6, seed=2)
    ref = measures.linear_cka(x, y)
    assert 0 < ref < 1
    assert measures.linear_cka(3.5 * x @ orthogonal(8, seed=3), y) == pytest.approx(ref, abs=1e-12)
    assert measures.linear_cka(x, 0.01 * y @ orthogonal(6, seed=4)) == pytest.approx(ref, abs=1e-12)
    assert measures.linear_cka(x @ orthogonal(8, seed=5), x) == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------------------------- TIR and bootstrap
def test_tir_on_hand_made_numbers_pairs_seed_i_with_seed_i():
    assert measures.task_interference_ratio(0.5, 0.25) == pytest.approx(0.5)
    assert measures.task_interference_ratio(0.5, 0.6) == pytest.approx(-0.2)  # negative: the unified model is better
    assert measures.task_interference_ratio(0.0, 0.1) is None  # undefined, not infinite
    spec = {1: np.array([0.4, 0.6]), 2: np.array([0.8, 0.8])}  # means 0.5, 0.8
    uni = {1: np.array([0.2, 0.3]), 2: np.array([0.8, 0.8])}  # means 0.25, 0.8
    res = measures.compare_to_specialist(spec, uni, n_resamples=100)
    assert res["seeds_paired"]
    assert res["tir_per_seed"] == pytest.approx([0.5, 0.0])
    assert res["tir_mean"] == pytest.approx(0.25)
    assert res["tir_std"] == pytest.approx(math.sqrt(2 * 0.25 ** 2))  # sample std (ddof 1) of [0.5, 0]
    assert res["bootstrap"]["mean"] == pytest.approx((0.2 + 0.3 + 0 + 0) / 4)


def test_tir_uses_the_specialist_mean_when_seeds_do_not_pair():
    spec = {1: np.array([0.5, 0.5]), 2: np.array([0.7, 0.9])}  # mean over seeds: 0.65
    uni = {7: np.array([0.6, 0.7])}  # 0.65
    res = measures.compare_to_specialist(spec, uni, n_resamples=100)
    assert not res["seeds_paired"]
    assert res["tir_per_seed"] == pytest.approx([0.0])
    assert res["tir_std"] is None  # one seed: no spread to report
    assert res["bootstrap"]["mean"] == pytest.approx(((0.6 - 0.6) + (0.7 - 0.7)) / 2)


def test_bootstrap_of_identical_systems_gives_p_1_and_a_ci_at_0():
    diff = np.zeros((2, 30))  # specialist - unified, per seed and query
    res = measures.paired_bootstrap(diff, n_resamples=2000)
    assert res["p_value"] == 1.0
    assert res["ci95"] == [0.0, 0.0] and res["mean"] == 0.0


def test_bootstrap_of_a_constant_large_gain_gives_p_near_0_and_a_ci_at_the_gain():
    diff = np.full((2, 30), 0.3)
    res = measures.paired_bootstrap(diff, n_resamples=2000)
    assert res["p_value"] == pytest.approx(1 / 2001)  # the smallest p the test can give
    assert res["ci95"] == pytest.approx([0.3, 0.3])


def test_bootstrap_ci_covers_the_mean_of_noisy_differences_and_is_not_significant_around_0():
    rng = np.random.default_rng(0)
    diff = rng.normal(0.0, 0.2, size=(3, 200))
    res = measures.paired_bootstrap(diff, n_resamples=2000)
    assert res["ci95"][0] < res["mean"] < res["ci95"][1]
    assert res["ci95"][0] < 0 < res["ci95"][1] and res["p_value"] > 0.05


def test_bootstrap_is_deterministic_for_a_fixed_seed():
    diff = np.random.default_rng(1).normal(0.05, 0.2, size=(2, 40))
    a, b = measures.paired_bootstrap(diff, 1000, seed=3), measures.paired_bootstrap(diff, 1000, seed=3)
    assert a == b
    assert measures.paired_bootstrap(diff, 1000, seed=4)["ci95"] != a["ci95"]  # the seed is what fixes it


# --------------------------------------------------------------------------------------------- gradient cosine
X = torch.tensor([1.0, 2.0, 0.0])  # d(w . x)/dw = x


@pytest.mark.parametrize("loss_b,want", [
    (lambda lin: 3 * lin(X).sum(), 1.0),  # gradient 3x: same direction
    (lambda lin: -2 * lin(X).sum(), -1.0),  # gradient -2x: opposite
    (lambda lin: lin(torch.tensor([2.0, -1.0, 5.0])).sum(), 0.0),  # gradient y with y . x = 0: orthogonal
])
def test_gradient_cosine_of_two_losses_with_known_gradients(loss_b, want):
    lin = nn.Linear(3, 1, bias=False)
    res = measures.gradient_cosine({"w": lin.weight}, lambda: lin(X).sum(), lambda: loss_b(lin))
    assert res["w"]["cos"] == pytest.approx(want, abs=1e-7)
    assert res["w"]["norm_a"] == pytest.approx(math.sqrt(5))


def test_gradient_cosine_is_undefined_on_a_tensor_only_one_loss_reaches():
    # A task-specific expert gets no gradient from the other task: "not shared", not a cosine of 0.
    a, b = nn.Linear(3, 1, bias=False), nn.Linear(3, 1, bias=False)
    res = measures.gradient_cosine({"a": a.weight, "b": b.weight}, lambda: a(X).sum() + b(X).sum(),
                                   lambda: b(X).sum())
    assert res["a"]["cos"] is None and res["a"]["norm_b"] == 0
    assert res["b"]["cos"] == pytest.approx(1.0)


def test_gradient_cosine_groups_select_slices_of_a_tensor():
    # The expert groups are rank slots of the stacked A/B: here row 0 of a (2, 3) weight agrees, row 1 opposes.
    lin = nn.Linear(3, 2, bias=False)
    groups = {"row0": [("w", (slice(0, 1), slice(None)))], "row1": [("w", (slice(1, 2), slice(None)))]}
    res = measures.gradient_cosine({"w": lin.weight}, lambda: lin(X).sum(),
                                   lambda: (lin(X) * torch.tensor([1.0, -1.0])).sum(), groups)
    assert res["row0"]["cos"] == pytest.approx(1.0) and res["row1"]["cos"] == pytest.approx(-1.0)


# --------------------------------------------------------------------------------------------- subspaces
def test_principal_angles_of_the_same_subspace_in_two_bases_are_all_0():
    a = random_matrix(20, 4, seed=0)
    b = a @ random_matrix(4, 4, seed=1)  # another basis of the same column space
    np.testing.assert_allclose(measures.principal_angles(a, b), 0.0, atol=1e-6)


def test_principal_angles_of_orthogonal_subspaces_are_all_pi_over_2():
    q = orthogonal(20, seed=2)
    angles = measures.principal_angles(q[:, :4] * 3.0, q[:, 4:7])
    assert angles.shape == (3,)  # min(r1, r2) angles
    np.testing.assert_allclose(angles, math.pi / 2, atol=1e-12)


def test_expert_delta_svd_equals_the_svd_of_the_dense_delta():
    # The spectrum comes from a small (r, r) core, never the (out, in) delta; it must match the dense SVD.
    experts = [moe_lora.ExpertSpec("embed", 3, 6.0), moe_lora.ExpertSpec("shared", 5, 2.0)]
    lin = moe_lora.MoELoRALinear(nn.Linear(12, 10), experts)
    with torch.no_grad():
        lin.lora_B.copy_(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)))
    for e, alpha_over_r in (("embed", 2.0), ("shared", 0.4)):
        sl = lin.expert_slice(e)
        scale = float(lin.slot_scale[sl][0])  # alpha / r as the model holds it: in fp32
        assert scale == pytest.approx(alpha_over_r)
        dense = scale * lin.lora_B.detach()[:, sl].double() @ lin.lora_A.detach()[sl].double()
        s, u = measures.expert_delta_svd(lin, e)
        np.testing.assert_allclose(s, np.linalg.svd(dense.numpy(), compute_uv=False)[:len(s)], rtol=1e-10)
        np.testing.assert_allclose(measures.principal_angles(u, dense.numpy()), 0.0, atol=1e-6)


# --------------------------------------------------------------------------------------------- significance entries
def test_task_rows_tests_a_unified_mode_against_its_specialist_with_aso_over_datasets():
    rng = np.random.default_rng(0)
    spec = {s: rng.random(6) for s in (1, 2, 3)}
    uni = {s: v - 0.05 for s, v in spec.items()}
    rows, comparisons = analysis.task_rows({"emb_only": spec, "joint_moe": uni}, "embed", n_resamples=100,
                                           n_datasets=3, n_aso=200)
    aso = rows["joint_moe"]["aso"]
    spec_means, uni_means = [float(spec[s].mean()) for s in (1, 2, 3)], [float(uni[s].mean()) for s in (1, 2, 3)]
    ref = measures.aso(spec_means, uni_means, num_comparisons=3, n_bootstrap=200, seed=0)
    assert (aso["a"], aso["b"]) == ("emb_only", "joint_moe") and aso["eps_min_a_over_b"] == ref["eps_min"]
    assert aso["confidence_level"] == pytest.approx(1 - 0.05 / 3)
    assert rows["joint_moe"]["bootstrap"]["mean"] == pytest.approx(0.05) and comparisons == {}


def test_bonferroni_is_over_the_datasets_of_each_test():
    def entry(p):
        return {"modes": {"joint_moe": {"bootstrap": {"p_value": p}}}, "comparisons": {}}
    datasets = {"a": {"embed": entry(0.02)}, "b": {"embed": entry(0.03)}}
    analysis.apply_bonferroni(datasets, alpha=0.05)
    # two datasets: threshold 0.025, so 0.02 passes and 0.03 (< 0.05 alone) does not
    assert datasets["a"]["embed"]["modes"]["joint_moe"]["bonferroni"] == {"m": 2, "threshold": 0.025,
                                                                        "significant": True}
    assert datasets["b"]["embed"]["modes"]["joint_moe"]["bonferroni"]["significant"] is False


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs of both specialists and two joint_moe seeds (unpaired with the specialists' one seed), and a
    TREC run of fixed rerank candidates for the dev queries."""
    root = tmp_path_factory.mktemp("analysis")
    task = tiny_setup.write_synthetic(str(root / "synthetic"))
    paths = []
    for mode, seed in (("emb_only", 0), ("rank_only", 0), ("joint_moe", 0), ("joint_moe", 1)):
        out = str(root / "runs" / f"{mode}_s{seed}")
        train.main([tiny_setup.write_config(str(root / f"{mode}_{seed}.yaml"), task, out, train={
            "mode": mode, "seed": seed, "steps": 4, "eval_every": 4, "save_every": 4})])
        paths.append(out)
    qrels = evaluate.load_split(task, "dev")[2]
    corpus = sorted(evaluate.load_split(task, "dev")[0])
    cands = {q: {**{d: 1.0 for d in rel}, **{d: 0.5 for d in corpus[:8]}} for q, rel in qrels.items()}
    ir.write_trec_run(str(root / "cands.trec"), cands)
    return task, paths, str(root / "cands.trec"), root


def analysis_cli(*args) -> str:
    res = subprocess.run([sys.executable, os.path.join(tiny_setup.REPO, "analysis.py"), *args],
                         env=tiny_setup.SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_every_subcommand_runs_end_to_end_on_tiny_runs(runs):
    task, paths, cands, root = runs
    out = str(root / "out")
    analysis_cli("interference", *paths, "--data", task, "--split", "dev", "--candidates", cands,
                 "--resamples", "200", "--out", out)
    inter = json.load(open(os.path.join(out, "interference.json")))
    tasks = inter["datasets"]["synthetic-dev"]
    assert list(tasks["embed"]["modes"]) == ["emb_only", "joint_moe"]  # rank_only does not train embedding
    assert tasks["rerank"]["stage"] == "rerank"  # the fixed candidates, not each model's own retrieval
    jm = tasks["rerank"]["modes"]["joint_moe"]
    assert jm["seeds"] == [0, 1] and not jm["seeds_paired"] and len(jm["tir_per_seed"]) == 2

    analysis_cli("gradients", paths[0], paths[2], "--batches", "2", "--out", out)
    emb_only, moe = json.load(open(os.path.join(out, "gradients.json")))
    assert set(emb_only["groups"]["all"]) == {"embed", "base", "adapters"}  # a task router has no parameters
    groups = moe["groups"]
    assert set(groups["all"]) == {"embed", "rerank", "shared", "base", "router", "adapters"}
    assert set(groups["0.q"]) == {"embed", "rerank", "shared", "base"} and set(groups["0.router"]) == {"router"}
    assert groups["all"]["shared"]["n"] == 2  # the shared expert is reached by both tasks on both batches

    analysis_cli("routing", paths[0], paths[2], "--n", "8", "--out", out)
    emb_only, moe = json.load(open(os.path.join(out, "routing.json")))
    assert emb_only["router"] == "task (fixed weights)" and moe["router"] == "learned"
    assert [s["step"] for s in moe["training"]] == [0, 4]
    assert moe["eval"]["synthetic-dev"]["experts"] == ["embed", "rerank", "shared"]

    analysis_cli("geometry", *paths, "--n", "8", "--out", out)
    geo = json.load(open(os.path.join(out, "geometry.json")))
    assert len(geo["cka_across_configs"]["embed"][-1]) == 4
    assert set(geo["experts"]["joint_moe_s0"]["summary"]["pairs"]) == {"embed/rerank", "embed/shared", "rerank/shared"}

    rep = str(root / "report")
    analysis_cli("report", *paths, "--batches", "2", "--n", "8", "--resamples", "200", "--out", rep)
    pngs = {"interference.png", "gradient_cosine.png", "routing.png", "cka.png", "expert_spectra.png"}
    assert {"report.md"} | pngs <= set(os.listdir(rep))
    assert "| embed (retrieval) | synthetic-dev | joint_moe | 0,1 |" in open(os.path.join(rep, "report.md")).read()


def test_report_without_matplotlib_fails_with_a_clear_message(runs, tmp_path, monkeypatch):
    # matplotlib is a plot-only dependency; its absence must be one clear error before any work is done.
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(analysis.AnalysisError, match="pip install matplotlib"):
        analysis.report([analysis.run_info(runs[1][0])], str(tmp_path / "report"))
    assert not os.path.exists(tmp_path / "report")


def test_a_wrong_checkpoint_path_is_one_error_line_naming_it(tmp_path, capsys):
    assert analysis.cli(["routing", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere: no checkpoint here" in err and err.count("\n") == 1
