"""The tiny task and config that test_train.py, test_ddp.py and ddp_worker.py build in a temporary directory.

Not a test module (no test_ prefix). Everything is small enough that a training step takes well under a second on
one CPU thread: a 300-document synthetic task, a one-layer random base of width 32, 3 hard negatives, short
sequences and one-word instructions.
"""
import copy
import os
import sys

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # ddp_worker.py runs as a script, without conftest.py
    sys.path.insert(0, REPO)

import config  # noqa: E402
import data  # noqa: E402
import moe_lora  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
import unimoer  # noqa: E402

SYNTHETIC = dict(seed=0, n_docs=300, n_train=200, n_dev=16, n_test=16, n_concepts=150)

BASE_CONFIG = {
    "model": {"tiny": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64}},
    "data": {"synthetic": False, "n_neg": 3, "max_query_len": 24, "max_doc_len": 32, "max_pair_len": 96,
             "embed_instruction": "Find it", "rerank_instruction": "Find it", "dev_queries": 16},
    "adapters": {"r": 4, "alpha": 8, "shared_r": 4, "shared_alpha": 8},
    "train": {"mode": "joint_moe", "steps": 6, "batch_size": 4, "lr": 1.0e-2, "warmup_steps": 2,
              "eval_every": 3, "save_every": 3, "rerank_topk": 5, "seed": 0},
}

# Subprocesses (train.py, torchrun workers) run on one thread each: the machine has 2 cores and is shared, and
# oversubscribed torch threads make a 0.05 s step take seconds.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": REPO}


def write_synthetic(out_dir: str) -> str:
    synthetic.make_synthetic(out_dir, **SYNTHETIC)
    return out_dir


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: str, data_dir: str, out_dir: str, **sections) -> str:
    """BASE_CONFIG with data.dir/train.out_dir filled in and `sections` ({"train": {...}, ...}) merged on top."""
    d = merge(BASE_CONFIG, {"data": {"dir": data_dir}, "train": {"out_dir": out_dir}})
    d = merge(d, sections)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    return path


def fixed_batch(data_dir: str, n_queries: int, n_neg: int) -> tuple:
    """(queries, docs) of the first n_queries training examples: docs grouped per query, positive first."""
    examples = data.read_train_jsonl(os.path.join(data_dir, "train.jsonl"))[:n_queries]
    return [ex["query"] for ex in examples], [x for ex in examples for x in [ex["pos"][0]] + ex["neg"][:n_neg]]


def step_chunks(um, data_dir: str, start: int, n_queries: int, chunks: int) -> list:
    """UniMoER.forward inputs, both tasks, of training examples [start, start + n_queries) (each with its first
    positive and first n_neg negatives), split into `chunks` consecutive parts of equal size."""
    examples = data.read_train_jsonl(os.path.join(data_dir, "train.jsonl"))[start:start + n_queries]
    b, n_neg = n_queries // chunks, um.cfg.data.n_neg
    return [unimoer.batch_inputs(um, {"query": [ex["query"] for ex in part], "pos": [ex["pos"][0] for ex in part],
                                    "neg": [n for ex in part for n in ex["neg"][:n_neg]]}, config.TASKS)
            for part in (examples[k * b:(k + 1) * b] for k in range(chunks))]


def randomize_lora_B(um, seed: int, std: float = 0.05) -> None:
    """Give every expert a non-zero B (B starts at zero, which would make the adapters and A's gradient vanish)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in um.base.modules():
            if isinstance(m, moe_lora.MoELoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)


def read_tree(d: str) -> dict:
    """{relative path: bytes} of every file under d: two trees compare equal iff they are byte-identical."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), d)] = fh.read()
    return out


def finished_run(root: str, task: str) -> tuple:
    """A finished 2-step tiny run on `task` in <root>/run -> (config path, run directory)."""
    cfg = write_config(os.path.join(root, "cfg.yaml"), task, os.path.join(root, "run"),
                       train={"steps": 2, "eval_every": 2, "save_every": 2, "warmup_steps": 1})
    train.main([cfg])
    return cfg, os.path.join(root, "run")
