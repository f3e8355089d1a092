"""A run directory keeps its last good state (issue 18), as a spec: no checkpoint is written inside a bad streak
and an explosive update is undone, pruning keeps the last good checkpoint, one run at a time (an OS lock), a fresh
run refuses a used directory unless told to overwrite, --resume refuses a changed config outside RESUMABLE_KEYS,
adapters must match their checkpoint's config, and a full disk is one line with exit 2.

Each test says what happened before the fix. Tiny runs built as in test_train.py (tiny_setup.py).
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import config
import evaluate
import runs
import tiny_setup
import train
import unimoer
from config import ConfigError

# The command on the tiny run: 6 good steps at lr 1e-3, then lr 1e30 (finite, but an explosive update).
EXPLODING = {"eval_every": 100, "save_every": 2,
             "stages": [{"steps": 6, "lr": 0.001}, {"steps": 14, "lr": 1.0e30}]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_setup.write_synthetic(str(tmp_path_factory.mktemp("rundir") / "synthetic"))


def write_cfg(tmp_path, task, name="cfg.yaml", out="run", **sections) -> str:
    return tiny_setup.write_config(str(tmp_path / name), task, str(tmp_path / out), **sections)


def checkpoints(out) -> list:
    return sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))


def pointer(out, name) -> str:
    return open(os.path.join(out, name)).read().strip()


def max_abs_weight(ckpt) -> float:
    return max(float(v.abs().max()) for v in load_file(os.path.join(ckpt, "adapters.safetensors")).values())


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------------------------- bad steps
def test_an_explosive_update_is_undone_and_the_last_good_checkpoint_survives_and_is_named(task, tmp_path):
    # Before: the lr-1e30 update (step 7) was applied, checkpoints 8 and 10 held |w| ~ 1e28 and pruning (keep 2)
    # deleted the good checkpoint 6; the stop message only said "is in <out_dir>". Now the default
    # train.max_update_rms (1.0) undoes step 7's update, steps 7-11 are bad, nothing is saved in the streak.
    cfg_path = write_cfg(tmp_path, task, train=EXPLODING)
    out = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteError, match=r"5 bad steps in a row .*last: step 11\); stopping\. The last "
                       r"good checkpoint is " + os.path.join(out, "checkpoint-000006").replace(".", r"\.") + "$"):
        train.main([cfg_path])
    assert checkpoints(out) == ["checkpoint-000004", "checkpoint-000006"]
    assert pointer(out, "latest") == pointer(out, "last_good") == "checkpoint-000006"
    assert max_abs_weight(os.path.join(out, "checkpoint-000006")) < 1.0
    logs = [json.loads(x) for x in open(os.path.join(out, "train_log.jsonl"))]
    assert [r["skipped"] for r in logs] == [False] * 6 + [True] * 4  # step 7's finite loss, but its update undone
    assert all(r["emb"] == r["emb"] for r in logs)  # the undone update never reached a forward: no NaN loss


def test_without_the_update_guard_a_bad_streak_writes_no_checkpoint(task, tmp_path):
    # With max_update_rms off, step 7's update is applied and the losses from step 8 on are NaN. Before, checkpoints
    # 8 and 10 were still written (with those weights); now a step inside a bad streak saves nothing.
    cfg_path = write_cfg(tmp_path, task, train={**EXPLODING, "max_update_rms": None})
    out = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteError, match=r"last: step 12\).*checkpoint-000006$"):
        train.main([cfg_path])
    assert checkpoints(out) == ["checkpoint-000004", "checkpoint-000006"]
    assert pointer(out, "latest") == "checkpoint-000006" and max_abs_weight(os.path.join(out, "checkpoint-000006")) < 1


def test_an_update_above_max_update_rms_is_undone_parameters_and_optimizer(task, tmp_path):
    # The guard by hand: an update of RMS 2.0 over all elements fails a bound of 1.0 and passes 3.0; undo restores
    # the parameters and AdamW's state exactly.
    p = torch.nn.Parameter(torch.zeros(4, 25))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    before = train.snapshot_update([p], opt)
    with torch.no_grad():
        p.add_(2.0)  # every element moves by 2: RMS = sqrt(100 * 4 / 100) = 2
    assert not train.update_is_sane([p], before, 1.0) and train.update_is_sane([p], before, 3.0)
    assert train.update_is_sane([p], before, None)
    opt.step()
    train.undo_update([p], opt, before)
    assert torch.equal(p.detach(), before[0][0])
    assert torch.equal(opt.state[p]["exp_avg"], before[1]["state"][0]["exp_avg"])
    assert float(opt.state[p]["step"]) == 1.0
    with torch.no_grad():
        p[0, 0] = float("inf")
    assert not train.update_is_sane([p], before, None)  # a non-finite parameter fails even without a bound


def test_pruning_keeps_the_newest_good_checkpoint_when_newer_ones_are_not_good(task, tmp_path, monkeypatch):
    # Dev metrics turn NaN from step 8 on. Before, keep=2 left checkpoints 8 and 10 and deleted 6, the last one with
    # finite dev metrics; now `last_good` names 6 and pruning never deletes it.
    dev_evaluate = evaluate.dev_evaluate
    calls = []

    def nan_from_step_8(um, dev, cfg):
        calls.append(1)
        m = dev_evaluate(um, dev, cfg)
        return {k: float("nan") for k in m} if len(calls) >= 5 else m  # calls: steps 0, 2, 4, 6, 8, 10

    monkeypatch.setattr(train, "dev_evaluate", nan_from_step_8)
    cfg_path = write_cfg(tmp_path, task, train={"steps": 10, "save_every": 2, "eval_every": 2})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    assert checkpoints(out) == ["checkpoint-000006", "checkpoint-000008", "checkpoint-000010"]
    assert pointer(out, "latest") == "checkpoint-000010" and pointer(out, "last_good") == "checkpoint-000006"


# --------------------------------------------------------------------------------------------- one run at a time
# train.py, paused right after writing checkpoint 3 until the file $GO exists (it touches $PAUSED first).
PAUSED_TRAIN = """
import os, sys, time
sys.path.insert(0, {repo!r})
import runs
import train

save_checkpoint = runs.save_checkpoint

def pausing(um, opt, cfg, step, *args, **kwargs):
    path = save_checkpoint(um, opt, cfg, step, *args, **kwargs)
    if step == 3:
        open(os.environ["PAUSED"], "w").close()
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.05)
    return path

train.save_checkpoint = pausing  # where train.py looks it up
sys.exit(train.cli(sys.argv[1:]))
"""

RUN = dict(train={"steps": 6, "save_every": 3, "eval_every": 2}, adapters={"dropout": 0.1})


def test_a_second_run_or_resume_on_a_running_dir_is_refused_naming_the_holder_and_the_first_finishes_unharmed(
        task, tmp_path):
    # Before: a second fresh run (or a --resume) started while the first was running both exited 0, their logs
    # interleaved and the final checkpoint was the second's. Now both are refused with one line naming the holder.
    cfg_path = write_cfg(tmp_path, task, **RUN)
    reference = str(tmp_path / "reference")
    train.main([cfg_path, f"--train.out_dir={reference}"])
    out = str(tmp_path / "run")
    script = tmp_path / "paused_train.py"
    script.write_text(PAUSED_TRAIN.format(repo=tiny_setup.REPO))
    paused, go = tmp_path / "paused", tmp_path / "go"
    env = {**tiny_setup.SUBPROCESS_ENV, "PAUSED": str(paused), "GO": str(go)}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, str(script), cfg_path], env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while not paused.exists() and first.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert paused.exists(), (tmp_path / "first.log").read_text()[-3000:]
            for argv in ([cfg_path], [cfg_path, "--resume"], [cfg_path, "--overwrite"]):
                with pytest.raises(runs.RunDirError, match=rf"^{out}: in use by another run \(pid {first.pid} on "
                                   r"\S+, started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ; lock file .*run\.lock\)") as e:
                    train.main(argv)
                assert "\n" not in str(e.value)
        finally:
            go.touch()
            first.wait(timeout=180)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    for name in ("train_log.jsonl", "metrics.jsonl"):  # the first run is exactly an uninterrupted run
        assert read(os.path.join(out, name)) == read(os.path.join(reference, name))
    assert checkpoints(out) == ["checkpoint-000003", "checkpoint-000006"]


def test_the_lock_is_released_when_the_run_ends_or_fails(task, tmp_path):
    cfg_path = write_cfg(tmp_path, task, train={"steps": 2, "save_every": 2, "eval_every": 2})
    train.main([cfg_path])
    with pytest.raises(ConfigError):  # a refused resume (changed seed) also releases the lock
        train.main([cfg_path, "--resume", "--train.seed=5"])
    runs.RunLock(str(tmp_path / "run")).release()  # free: nothing holds it any more


# --------------------------------------------------------------------------------------------- fresh runs
def test_a_fresh_run_refuses_a_run_dir_without_latest_and_overwrite_removes_the_old_run(task, tmp_path):
    # Before: with `latest` deleted a fresh run removed the old logs but kept the stale checkpoint-000006 beside its
    # own new checkpoints.
    old_cfg = write_cfg(tmp_path, task, name="old.yaml", train={"steps": 6, "save_every": 3, "eval_every": 6})
    train.main([old_cfg])
    out = str(tmp_path / "run")
    os.remove(os.path.join(out, "latest"))
    before = sorted(os.listdir(out))
    new_cfg = write_cfg(tmp_path, task, name="new.yaml", train={"steps": 2, "save_every": 2, "eval_every": 2})
    with pytest.raises(FileExistsError, match=r"already holds a run; pass --resume to continue it, --overwrite to "
                       r"delete it.*found: checkpoint-000003, checkpoint-000006"):
        train.main([new_cfg])
    assert sorted(os.listdir(out)) == before
    train.main([new_cfg, "--overwrite"])
    assert checkpoints(out) == ["checkpoint-000002"] and pointer(out, "latest") == "checkpoint-000002"
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "train_log.jsonl"))] == [1, 2]
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["train"]["steps"] == 2


def test_leftovers_of_interrupted_writes_are_removed_at_the_start_of_a_run(task, tmp_path):
    # Before: .tmp-ckpt-* directories of killed checkpoint writes piled up (7 after 9 kills).
    cfg_path = write_cfg(tmp_path, task, train={"steps": 2, "save_every": 2, "eval_every": 2})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, ".tmp-ckpt-abc123"))
    open(os.path.join(out, ".tmp-ckpt-abc123", "adapters.safetensors"), "w").close()
    open(os.path.join(out, ".tmp-xyz"), "w").close()  # a killed write_text_atomic
    train.main([cfg_path, "--resume", "--train.steps=3"])
    assert glob.glob(os.path.join(out, ".tmp-*")) == []


# --------------------------------------------------------------------------------------------- resume config
def test_a_resume_that_changes_a_fixed_setting_is_one_error_listing_the_keys(task, tmp_path):
    # Before: `--resume --train.seed=3 --train.batch_size=8` was accepted silently and config.yaml kept the old values.
    cfg_path = write_cfg(tmp_path, task, train={"steps": 2, "save_every": 2, "eval_every": 2})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    before = {n: read(os.path.join(out, n)) for n in ("config.yaml", "train_log.jsonl", "latest")}
    with pytest.raises(ConfigError, match=r"^--resume: the config differs from .*config\.yaml in keys a resume may not "
                       r"change: train\.batch_size \(4 -> 8\), train\.seed \(0 -> 3\); start a fresh run") as e:
        train.main([cfg_path, "--resume", "--train.seed=3", "--train.batch_size=8", "--train.steps=4"])
    assert "\n" not in str(e.value)
    assert {n: read(os.path.join(out, n)) for n in before} == before
    assert not os.path.exists(os.path.join(out, "resumes.jsonl"))


def test_a_resume_with_more_steps_is_logged_and_recorded_in_the_run_history(task, tmp_path, capsys):
    cfg_path = write_cfg(tmp_path, task, train={"steps": 2, "save_every": 2, "eval_every": 2})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    train.main([cfg_path, "--resume", "--train.steps=4", "--train.eval_every=4"])
    assert "--resume: train.steps: 2 -> 4" in capsys.readouterr().out
    history = [json.loads(x) for x in open(os.path.join(out, "resumes.jsonl"))]
    assert [(h["step"], h["changes"]) for h in history] == [
        (2, {"train.eval_every": [2, 4], "train.steps": [2, 4]})]
    cfg = config.load_config(os.path.join(out, "config.yaml"))  # still a plain config, now with the new values
    assert (cfg.train.steps, cfg.train.eval_every) == (4, 4)
    assert pointer(out, "latest") == "checkpoint-000004"
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))] == [0, 2, 4]
    # a second resume with the now-recorded settings changes nothing and is recorded as such
    train.main([cfg_path, "--resume", "--train.steps=4", "--train.eval_every=4"])
    assert json.loads(open(os.path.join(out, "resumes.jsonl")).readlines()[-1])["changes"] == {}


# --------------------------------------------------------------------------------------------- adapters
def test_adapters_of_another_mode_are_refused_naming_the_mismatch(task, tmp_path):
    # Before: load_run rebuilt the experts from the adapter file's own spec, so a joint_moe checkpoint holding an
    # emb_only run's adapters loaded silently and evaluate.py reported mode joint_moe.
    short = {"steps": 1, "save_every": 1, "eval_every": 1}
    train.main([write_cfg(tmp_path, task, name="emb.yaml", out="emb", train={**short, "mode": "emb_only"})])
    train.main([write_cfg(tmp_path, task, name="moe.yaml", out="moe", train={**short, "mode": "joint_moe"})])
    ckpt = unimoer.checkpoint_dir(str(tmp_path / "moe"))
    shutil.copy(os.path.join(unimoer.checkpoint_dir(str(tmp_path / "emb")), "adapters.safetensors"),
                os.path.join(ckpt, "adapters.safetensors"))
    want = (r"adapters\.safetensors: the adapters do not match .*config\.yaml \(train\.mode 'joint_moe'\): "
            r"experts: embed r=4 in the file, embed r=4, rerank r=4, shared r=4 in the config; .*router: ")
    with pytest.raises(ValueError, match=want):
        unimoer.load_run(str(tmp_path / "moe"))
    with pytest.raises(ValueError, match=want):
        unimoer.load_model(str(tmp_path / "moe"))
    with pytest.raises(ValueError, match=want.replace(r".*config\.yaml", "the resumed config")):
        train.main([str(tmp_path / "moe.yaml"), "--resume", "--train.steps=2"])


# --------------------------------------------------------------------------------------------- full or read-only disk
def error_lines(stderr: str) -> list:
    """The texts of train.cli's error lines (the progress bar's carriage returns may precede one on its line)."""
    return [ln.split("train.py: error: ", 1)[1] for ln in stderr.splitlines() if "train.py: error: " in ln]


def test_a_full_disk_is_one_line_exit_2_and_the_previous_checkpoint_is_intact(task, tmp_path, monkeypatch, capsys):
    # Before: a traceback. torch.save reports a full disk as a RuntimeError from its C++ writer, simulated here.
    cfg_path = write_cfg(tmp_path, task, train={"steps": 4, "save_every": 2, "eval_every": 4})
    out = str(tmp_path / "run")
    torch_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", full_disk)
    assert train.cli([cfg_path]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"{out}/.tmp-ckpt-")
    assert "writing checkpoint-000004 failed" in err[0]
    assert "the previous checkpoint (checkpoint-000002) is intact" in err[0]
    assert pointer(out, "latest") == "checkpoint-000002" and glob.glob(os.path.join(out, ".tmp-*")) == []
    unimoer.load_run(out)


def can_bind_read_only() -> bool:
    """Root ignores permissions; it can still make a read-only view with a bind mount in its own mount namespace."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return os.geteuid() != 0
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt && mount -o remount,bind,ro /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_bind_read_only(), reason="running as root without mount namespaces: neither chmod nor a "
                    "read-only bind mount can make out_dir read-only here (the full-disk test covers write failures)")
def test_a_read_only_out_dir_is_one_line_exit_2_and_the_checkpoint_is_intact(task, tmp_path):
    cfg_path = write_cfg(tmp_path, task, train={"steps": 2, "save_every": 2, "eval_every": 2})
    train.main([cfg_path])
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoint-000002")
    before = {e: read(os.path.join(ckpt, e)) for e in os.listdir(ckpt)}
    cmd = [sys.executable, os.path.join(tiny_setup.REPO, "train.py"), cfg_path, "--resume", "--train.steps=4"]
    if os.geteuid() == 0:  # a read-only bind mount of out_dir over itself, visible to this one command only
        res = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind "{out}" "{out}" && mount -o remount,bind,ro '
                              f'"{out}" && exec "$@"', "sh", *cmd], capture_output=True, text=True,
                             env=tiny_setup.SUBPROCESS_ENV, timeout=300)
    else:
        os.chmod(out, 0o555)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=tiny_setup.SUBPROCESS_ENV, timeout=300)
        finally:
            os.chmod(out, 0o755)
    assert res.returncode == 2, res.stderr[-3000:]
    err = error_lines(res.stderr)
    assert len(err) == 1 and out in err[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert pointer(out, "latest") == "checkpoint-000002"
    assert {e: read(os.path.join(ckpt, e)) for e in before} == before
