"""A run killed during setup leaves nothing half-written (issue 17), as a spec: the synthetic task and the tiny base
appear only complete (data.build_dir_atomically), a killed writer's temporary is removed and never read, two
setups at once on one data directory both succeed with identical data.

Before the fix a kill while data/synthetic was written left a folder without tokenizer.json, and every later run
stopped with "tokenizer.json not found" and a traceback. The writers are killed here at chosen points by a child
script that wraps one library function to hang before its n-th call (test code only; the library has no hooks).
"""
import os
import signal
import subprocess
import sys
import time

import pytest

import config
import data
import tiny_setup
import train

# The child: hang before the n-th call of $HANG_BEFORE ("module.function:n", touching $HANG_MARKER first), wait for
# every file in $READY_WAIT to exist (touching $READY_SELF), then set up a run as train.py does (train.prepare).
SETUP = """
import os, sys, time
sys.path.insert(0, {repo!r})
import shutil
import safetensors.torch
import config, data, synthetic, train

if os.environ.get("HANG_BEFORE"):
    target, n = os.environ["HANG_BEFORE"].rsplit(":", 1)
    module_name, attr = target.rsplit(".", 1)
    module = {{"data": data, "synthetic": synthetic, "os": os, "shutil": shutil, "safetensors.torch": safetensors.torch}}[module_name]
    real, calls = getattr(module, attr), []

    def hanging(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(n):
            open(os.environ["HANG_MARKER"], "w").close()
            time.sleep(600)
        return real(*args, **kwargs)

    setattr(module, attr, hanging)
if os.environ.get("READY_SELF"):
    open(os.environ["READY_SELF"], "w").close()
    while not all(os.path.exists(p) for p in os.environ["READY_WAIT"].split(os.pathsep)):
        time.sleep(0.01)
train.prepare(config.load_config(sys.argv[1]), 0)
"""

SETUP_CFG = dict(data={"synthetic": True}, train={"steps": 1, "save_every": 1, "eval_every": 1})


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


def setup_config(root, data_dir=None, out=None) -> str:
    return tiny_setup.write_config(os.path.join(root, "cfg.yaml"), data_dir or os.path.join(root, "data"),
                                   out or os.path.join(root, "run"), **SETUP_CFG)


tree = tiny_setup.read_tree


def leftovers(*dirs) -> list:
    return [os.path.join(d, e) for d in dirs if os.path.isdir(d) for e in os.listdir(d) if e.startswith(".tmp-")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted setup: (synthetic data files, tiny base files)."""
    root = str(tmp_path_factory.mktemp("reference"))
    train.prepare(config.load_config(setup_config(root)), 0)
    return tree(os.path.join(root, "data")), tree(os.path.join(root, "run", "base"))


def start_setup(tmp_path, cfg_path, name, **env) -> subprocess.Popen:
    script = tmp_path / "setup.py"
    script.write_text(SETUP.format(repo=tiny_setup.REPO))
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(script), cfg_path], stdout=log, stderr=subprocess.STDOUT,
                            env={**tiny_setup.SUBPROCESS_ENV, **env})


# --------------------------------------------------------------------------------------------- build_dir_atomically
def test_a_complete_directory_appears_at_once_and_an_existing_one_is_kept(tmp_path):
    final = str(tmp_path / "art")

    def write(d):
        assert not os.path.exists(final)  # nothing under the final name while writing
        open(os.path.join(d, "a.txt"), "w").write("one")

    assert data.build_dir_atomically(final, write) is True
    assert tree(final) == {"a.txt": b"one"} and leftovers(str(tmp_path)) == []
    assert data.build_dir_atomically(final, lambda d: pytest.fail("must not rebuild")) is False


def test_a_leftover_temporary_is_removed_and_never_read(tmp_path):
    final = str(tmp_path / "art")
    os.makedirs(tmp_path / ".tmp-art-killed")
    open(tmp_path / ".tmp-art-killed" / "half.txt", "w").write("half")  # a killed builder's partial copy
    data.build_dir_atomically(final, lambda d: open(os.path.join(d, "a.txt"), "w").write("one"))
    assert tree(final) == {"a.txt": b"one"} and leftovers(str(tmp_path)) == []


def test_a_failing_writer_leaves_neither_the_directory_nor_a_temporary(tmp_path):
    def write(d):
        open(os.path.join(d, "a.txt"), "w").write("one")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device: '.*\.tmp-art-") as e:  # names where it failed
        data.build_dir_atomically(str(tmp_path / "art"), write)
    assert e.value.errno == 28
    assert not os.path.exists(tmp_path / "art") and leftovers(str(tmp_path)) == []


def test_when_another_writer_renamed_first_the_rename_decides_and_this_copy_is_discarded(tmp_path):
    # Another process (one not honouring the flock, e.g. on a file system without it) finishes first.
    final = str(tmp_path / "art")

    def write(d):
        os.makedirs(final)
        open(os.path.join(final, "a.txt"), "w").write("theirs")
        open(os.path.join(d, "a.txt"), "w").write("ours")

    assert data.build_dir_atomically(final, write) is False
    assert tree(final) == {"a.txt": b"theirs"} and leftovers(str(tmp_path)) == []


# --------------------------------------------------------------------------------------------- killed setups
@pytest.mark.parametrize("hang_before,data_done", [
    ("synthetic.write_text_atomic:5", False),  # synthetic task: 4 files written
    ("os.rename:1", False),  # synthetic task complete in its temporary, not yet renamed
    ("shutil.copy:2", True),  # tiny base: weights, config.json and tokenizer.json written
    ("os.rename:2", True),  # tiny base complete in its temporary, not yet renamed
])
def test_a_setup_killed_at_any_point_leaves_nothing_half_written_and_the_next_run_matches(tmp_path, reference,
                                                                                         hang_before, data_done):
    cfg_path = setup_config(str(tmp_path))
    marker = tmp_path / "hanging"
    proc = start_setup(tmp_path, cfg_path, "killed", HANG_BEFORE=hang_before, HANG_MARKER=str(marker))
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    data_dir, base = str(tmp_path / "data"), str(tmp_path / "run" / "base")
    # What the kill left: a temporary, and under the final names only what was complete before
    assert leftovers(str(tmp_path), str(tmp_path / "run"))
    assert not os.path.exists(base)
    assert tree(data_dir) == reference[0] if data_done else not os.path.exists(data_dir)

    train.main([cfg_path])  # the next run sets up and trains
    assert tree(data_dir) == reference[0]
    assert tree(base) == reference[1]
    assert leftovers(str(tmp_path), str(tmp_path / "run")) == []


def test_two_setups_at_once_on_one_fresh_data_dir_both_succeed_with_identical_data(tmp_path, reference):
    # Before: both wrote into data/synthetic at once (and a reader could see it half-written).
    ready = [str(tmp_path / f"ready{i}") for i in range(2)]
    procs = []
    for i in range(2):  # one data dir, two run dirs; both start writing as soon as both have started
        cfg_path = setup_config(str(tmp_path / f"r{i}"), data_dir=str(tmp_path / "data"))
        procs.append(start_setup(tmp_path, cfg_path, f"setup{i}", READY_SELF=ready[i],
                                 READY_WAIT=os.pathsep.join(ready)))
    for i, p in enumerate(procs):
        p.wait(timeout=240)
        assert p.returncode == 0, (tmp_path / f"setup{i}.log").read_text()[-3000:]
    assert tree(str(tmp_path / "data")) == reference[0]
    for i in range(2):
        assert tree(str(tmp_path / f"r{i}" / "run" / "base")) == reference[1]
    assert leftovers(str(tmp_path)) == []
