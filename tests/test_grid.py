"""grid.py, the experiment grid: a tiny grid (2 modes x 2 seeds, 2 training steps each, tests/tiny_setup.py's model)
trains every run once; a second call trains nothing; a killed run is resumed and ends as the uninterrupted one; a
failed run is reported with its log and does not stop the others; a bad grid or run config stops the grid before
anything is written; the report's ASO is measures.aso on the runs' per-seed scores."""
import contextlib
import io
import json
import os
import re
import shutil

import pytest
import yaml
from safetensors.torch import load_file

import grid
import measures
import runs
import tiny_setup

SEEDS, MODES = [1, 2], ["joint_moe", "hard_switch"]
REPORT_ARGS = ["--resamples", "200", "--batches", "1", "--n", "2", "--no-base-probe"]


def write_grid(root: str, out: str, **keys) -> str:
    """A grid YAML over <root>/base.yaml (tiny_setup's config: 2 steps, a checkpoint after each) -> its path."""
    d = {"out": out, "config": os.path.join(root, "base.yaml"), "modes": MODES, "seeds": SEEDS, "jobs": 2,
         "report": {"compare": [MODES], "args": REPORT_ARGS}, **keys}
    path = os.path.join(root, f"{os.path.basename(out)}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return path


def call(argv: list) -> tuple:
    """grid.cli in-process -> (exit code, its stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = grid.cli(argv)
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny grid run once (trains all 4 runs, then the report) -> {root, path, out, stdout}."""
    root = str(tmp_path_factory.mktemp("grid"))
    task = tiny_setup.write_synthetic(os.path.join(root, "task"))
    tiny_setup.write_config(os.path.join(root, "base.yaml"), task, os.path.join(root, "unused"),
                            data={"dev_queries": 8},
                            train={"steps": 2, "eval_every": 2, "save_every": 1, "warmup_steps": 1})
    out = os.path.join(root, "out")
    path = write_grid(root, out)
    code, stdout = call([path])
    assert code == 0, stdout
    return {"root": root, "path": path, "out": out, "stdout": stdout}


def run_dir(out: str, mode: str, seed: int) -> str:
    return os.path.join(out, f"{mode}_s{seed}")


def test_the_first_call_trains_every_run_to_its_last_step(trained):
    assert "4 runs, 0 finished (skipped), 0 to resume, 4 to train" in trained["stdout"]
    for mode in MODES:
        for seed in SEEDS:
            d = run_dir(trained["out"], mode, seed)
            assert runs.latest_step(d) == 2
            with open(os.path.join(trained["out"], "logs", f"{mode}_s{seed}.log")) as f:
                log = f.read()
            assert log.count("=== ") == 1 and "--resume" not in log.splitlines()[0]


def test_the_second_call_starts_no_training(trained):
    logs = os.path.join(trained["out"], "logs")
    before = {m: tiny_setup.read_tree(run_dir(trained["out"], m, s)) for m in MODES for s in SEEDS}
    log_times = {f: os.stat(os.path.join(logs, f)).st_mtime_ns for f in os.listdir(logs)}
    code, stdout = call([trained["path"], "--no-report"])
    assert code == 0 and "4 runs, 4 finished (skipped), 0 to resume, 0 to train" in stdout
    # no subprocess: no log was appended to, no run directory changed (train.py would rewrite run.lock and logs)
    assert {f: os.stat(os.path.join(logs, f)).st_mtime_ns for f in os.listdir(logs)} == log_times
    assert {m: tiny_setup.read_tree(run_dir(trained["out"], m, s)) for m in MODES for s in SEEDS} == before


def test_a_killed_run_is_resumed_and_ends_as_the_uninterrupted_run(trained, tmp_path):
    """The state of a run killed during step 2: its checkpoint of step 1 is `latest`, step 2 never saved."""
    full = run_dir(trained["out"], "joint_moe", 1)
    out = str(tmp_path / "out")
    killed = run_dir(out, "joint_moe", 1)
    shutil.copytree(full, killed)
    shutil.rmtree(os.path.join(killed, "checkpoint-000002"))
    for pointer in ("latest", "last_good"):
        with open(os.path.join(killed, pointer), "w") as f:
            f.write("checkpoint-000001\n")
    path = write_grid(trained["root"], out, modes=["joint_moe"], seeds=[1])
    code, stdout = call([path, "--no-report"])
    assert code == 0 and "1 to resume, 0 to train" in stdout, stdout
    with open(os.path.join(out, "logs", "joint_moe_s1.log")) as f:
        assert f.readline().rstrip().endswith("--resume")
    a = load_file(os.path.join(killed, "checkpoint-000002", "adapters.safetensors"))
    b = load_file(os.path.join(full, "checkpoint-000002", "adapters.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    with open(os.path.join(killed, "metrics.jsonl")) as f, open(os.path.join(full, "metrics.jsonl")) as g:
        assert f.read() == g.read()


def test_a_failed_run_is_reported_with_its_log_and_the_others_go_on(trained, tmp_path):
    out = str(tmp_path / "out")
    # one at a time: the second run starts only after the first failed
    path = write_grid(trained["root"], out, seeds=[1], jobs=1, overrides={"broken": ["--data.dir=/nonexistent"]})
    code, stdout = call([path, "--no-report"])
    assert code == 1
    for mode in MODES:
        log = os.path.join(out, "logs", f"{mode}-broken_s1.log")
        assert f"{mode}-broken_s1: FAILED (exit 2" in stdout and f"log: {log}" in stdout
        with open(log) as f:
            assert "data.dir '/nonexistent': directory not found" in f.read()
    assert "0 trained or resumed, 0 skipped, 2 failed" in stdout


def test_a_bad_run_config_stops_the_grid_before_anything_is_written(trained, tmp_path, capsys):
    out = tmp_path / "out"
    path = write_grid(trained["root"], str(out), overrides={"bad": ["--train.lr=-1"]})
    assert grid.cli([path]) == 2
    err = capsys.readouterr().err
    assert f"{path}: run joint_moe-bad_s1: " in err and "train.lr must be > 0 (got -1.0)" in err
    assert not out.exists()


@pytest.mark.parametrize("key,value,message", [
    ("overrides", {"x": ["--train.seed=3"]}, r"overrides\.x\[0\] must be not train\.seed or train\.out_dir"),
    ("seeds", [1, 1], r"seeds must be a non-empty list of different seeds"),
    ("report", {"compare": [["joint_moe", "joint_moe"]]}, r"report\.compare\[0\] must be two different modes"),
    ("report", {"groups": {"g": ["joint_moe", "joint_moe-lr"]}}, r"runs joint_moe and joint_moe-lr are both mode "
                                                                    r"joint_moe"),
])
def test_a_bad_grid_value_is_one_error_naming_the_key(trained, tmp_path, capsys, key, value, message):
    over = {key: value, **({"overrides": {"default": [], "lr": ["--train.lr=0.02"]}} if key == "report" else {})}
    path = write_grid(trained["root"], str(tmp_path / "out"), **over)
    assert grid.cli([path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"grid.py: error: {path}: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_a_finished_run_under_a_changed_grid_is_an_error_not_a_skip(trained, capsys):
    path = write_grid(trained["root"], trained["out"], common=["--train.lr=0.02"])
    assert grid.cli([path, "--dry-run"]) == 2
    assert "is finished, but the grid now asks for another config" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(trained, tmp_path):
    out = tmp_path / "out"
    code, stdout = call([write_grid(trained["root"], str(out)), "--dry-run"])
    assert code == 0 and not out.exists()
    assert "joint_moe_s1: fresh: " in stdout and f"--train.out_dir={out}/hard_switch_s2" in stdout
    assert "analysis.py report" in stdout and "--compare joint_moe:hard_switch" in stdout


def test_the_reports_aso_is_measures_aso_on_the_runs_per_seed_scores(trained):
    with open(os.path.join(trained["out"], "report", "interference.json")) as f:
        inter = json.load(f)
    (ds, tasks), = inter["datasets"].items()
    for task, stage in (("embed", "retrieval"), ("rerank", "rerank")):
        per_seed = {}
        for mode in MODES:  # each run's own evaluation of the task, as evaluate.py wrote it
            per_seed[mode] = []
            for seed in SEEDS:
                with open(os.path.join(run_dir(trained["out"], mode, seed), "checkpoint-000002", "eval", ds,
                                       "metrics.json")) as f:
                    per_seed[mode].append(json.load(f)[stage]["ndcg@10"])
        c = tasks[task]["comparisons"]["joint_moe vs hard_switch"]
        ref = measures.aso(per_seed["joint_moe"], per_seed["hard_switch"], num_comparisons=1, n_bootstrap=1000,
                           seed=0)
        ref_ba = measures.aso(per_seed["hard_switch"], per_seed["joint_moe"], n_bootstrap=1000, seed=0)
        assert c["aso"]["eps_min_a_over_b"] == pytest.approx(ref["eps_min"], abs=1e-12)
        assert c["aso"]["eps_min_b_over_a"] == pytest.approx(ref_ba["eps_min"], abs=1e-12)
        assert c["bonferroni"] == {"m": 1, "threshold": 0.05, "significant": c["bootstrap"]["p_value"] <= 0.05}
    with open(os.path.join(trained["out"], "report", "report.md")) as f:
        assert "Bonferroni over the 1 dataset compared" in f.read()
