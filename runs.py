"""The run directory: checkpoints (atomic, pruned, `latest` / `last_good`), the trainer state, the jsonl logs, the
run lock and the rules of a fresh run or a --resume; and the built-in tiny base that a run writes to <out_dir>/base.

A checkpoint directory <out_dir> holds config.yaml (the resolved config), metrics.jsonl (one line per dev
evaluation), train_log.jsonl (one line per step), base/ (only for the built-in tiny base) and checkpoint-NNNNNN/
directories (adapters.safetensors: experts and routers; head.safetensors: the optional linear reranking head;
nli_head.safetensors: an extension's classification head;
trainer_state.pt: optimizer, RNG and step; config.yaml) named by the text file `latest`. Each checkpoint is written
to a temporary directory and renamed, so a kill at any moment leaves the previous one whole. Also: run.lock
(flock'ed by the running process), last_good (the newest good checkpoint, never pruned) and resumes.jsonl (what
each --resume changed; see open_run_dir and RESUMABLE_KEYS).

Reading order: config.yaml -> the tiny base (write_tiny_base, pretrain_tiny_base, its cache) -> checkpoints
(save_checkpoint, load_trainer_state) -> jsonl logs -> the run directory (RunLock, fresh run, resume, open_run_dir).
"""
from __future__ import annotations

import ast
import contextlib
import copy
import fcntl
import fnmatch
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

import data
import moe_lora
from config import Config, ConfigError, TinyBase, load_run_config
from ir import write_text_atomic
from model import CausalLM, ModelConfig, load_tokenizer
from unimoer import NLI_HEAD_FILE, UniMoER, check_adapters_match, trainable_parameters


# --------------------------------------------------------------------------------------------- config.yaml
def save_config(cfg: Config, path: str) -> None:
    write_text_atomic(path, yaml.safe_dump(asdict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------- the tiny base
def write_tiny_base(cfg: Config, out: str) -> None:
    """Write the built-in tiny base as an HF directory `out` (config.json, model.safetensors, tokenizer files):
    random weights N(0, init_std^2) from tiny.seed, then, if tiny.pretrain_steps > 0, pretrain_tiny_base on the
    documents of <data.dir>/corpus.jsonl (the only data file read). Written atomically (data.build_dir_atomically):
    an existing `out` is kept, a killed write leaves only a temporary, never read."""
    def write(tmp: str) -> None:
        tiny, tok_src = cfg.model.tiny, cfg.model.tokenizer or cfg.data.dir
        tok = load_tokenizer(tok_src)
        hf = {"model_type": "qwen3", "vocab_size": tok.vocab_size, "hidden_size": tiny.hidden_size,
              "intermediate_size": tiny.intermediate_size, "num_hidden_layers": tiny.num_hidden_layers,
              "num_attention_heads": tiny.num_attention_heads, "num_key_value_heads": tiny.num_key_value_heads,
              "head_dim": tiny.head_dim, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False}
        gen = torch.Generator().manual_seed(tiny.seed)
        model = CausalLM(ModelConfig.from_hf_dict(hf))
        state = {k: (torch.randn(v.shape, generator=gen) * tiny.init_std if not k.endswith("norm.weight") else v)
                 for k, v in model.state_dict().items()}
        if tiny.pretrain_steps > 0:
            model.load_state_dict(state)
            texts = [data.doc_text(d) for d in data.load_corpus(cfg.data.dir).values()]
            docs = tok.encode_ids(texts, cfg.data.max_doc_len, add_special_tokens=False)
            pretrain_tiny_base(model, docs, tok.eos_id, tiny)
            state = {k: v.detach() for k, v in model.state_dict().items()}
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        src_dir = tok_src if os.path.isdir(tok_src) else os.path.dirname(tok_src)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy(os.path.join(src_dir, name), os.path.join(tmp, name))

    data.build_dir_atomically(out, write)


def pretrain_sequences(docs: Sequence[list], eos: int, n_docs: int, batch: int, seed: int, step: int) -> list:
    """The token-id sequences of pretraining step `step`, a pure function of (seed, step).

    Each sequence is n_docs random documents and then the first of them again, EOS after each:
    d_1 EOS d_2 EOS ... d_n EOS d_1 EOS. The recurrence is predictable only by finding d_1's tokens earlier in
    the context, which is what grows the token-matching (induction) attention a pretrained LM has; nothing else
    relates the documents of a sequence (no queries, labels or train.jsonl are involved).
    """
    rng = np.random.default_rng([seed, step])
    out = []
    for _ in range(batch):
        picked = rng.choice(len(docs), size=n_docs, replace=False)
        seq = []
        for j in list(picked) + [picked[0]]:
            seq += list(docs[j]) + [eos]
        out.append(seq)
    return out


def pretrain_tiny_base(model: CausalLM, docs: Sequence[list], eos: int, tiny: TinyBase) -> list:
    """Train every weight of `model` as a causal LM on pretrain_sequences (AdamW, linear warmup over the first
    10% of steps, then constant; clip 1.0), in place, deterministic given tiny.seed. -> the loss per step."""
    gen_state = torch.get_rng_state()
    torch.manual_seed(tiny.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_lr, weight_decay=0.0)
    warm = max(1, tiny.pretrain_steps // 10)
    losses = []
    model.train()
    for step in range(tiny.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = tiny.pretrain_lr * min(1.0, (step + 1) / warm)
        seqs = pretrain_sequences(docs, eos, tiny.pretrain_docs, tiny.pretrain_batch, tiny.seed, step)
        T = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), T), eos, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
        hidden = model(ids, mask).hidden  # (B, T, H)
        logits = model.lm_logits(hidden[:, :-1])  # (B, T-1, V): position t predicts token t+1
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    torch.set_rng_state(gen_state)
    return losses


def tiny_base_cache_dir(cfg: Config) -> str:
    """Where the pretrained tiny base of this data and tiny config is cached: a sibling of data.dir named
    <data.dir>.tiny-base-<hash>, the hash over model.tiny, data.max_doc_len and the bytes of the files it reads."""
    h = hashlib.sha256(json.dumps([asdict(cfg.model.tiny), cfg.data.max_doc_len], sort_keys=True).encode())
    tok_src = cfg.model.tokenizer or cfg.data.dir
    tok_file = os.path.join(tok_src, "tokenizer.json") if os.path.isdir(tok_src) else tok_src
    for path in (os.path.join(cfg.data.dir, "corpus.jsonl"), tok_file):
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return f"{os.path.normpath(cfg.data.dir)}.tiny-base-{h.hexdigest()[:12]}"


def copy_dir_atomically(src: str, dst: str) -> None:
    """Copy directory src to dst so that dst is whole or absent (data.build_dir_atomically)."""
    data.build_dir_atomically(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(um: UniMoER, opt, cfg: Config, step: int, bad_steps: int, keep: int = 2,
                    mtl_state: Optional[dict] = None) -> str:
    """Write <out_dir>/checkpoint-<step> atomically (temporary directory, then rename), then point `latest` at it.

    A good checkpoint (checkpoint_is_good) is also named by `last_good`. Pruning keeps the `keep` newest and the
    one `last_good` names. mtl_state: train.mtl's method state (task weights, their optimizer, L_i(0), FAMO's
    previous losses), kept in trainer_state.pt under "mtl". A failed write (disk full, read-only) removes its
    temporary directory and raises one RunDirError naming it; the previous checkpoint is untouched.
    """
    out = cfg.train.out_dir
    name = f"checkpoint-{step:06d}"
    tmp = None
    try:
        tmp = tempfile.mkdtemp(dir=out, prefix=".tmp-ckpt-")
        moe_lora.save_adapters(um.base, os.path.join(tmp, "adapters.safetensors"))
        if um.head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in um.head.state_dict().items()},
                      os.path.join(tmp, "head.safetensors"))
        if um.nli_head is not None:  # an extension's classification head
            save_file({k: v.detach().cpu().contiguous() for k, v in um.nli_head.state_dict().items()},
                      os.path.join(tmp, NLI_HEAD_FILE))
        rng = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
               "numpy_pos": np.random.get_state()[2], "python": repr(random.getstate())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {"step": step, "bad_steps": bad_steps, "optimizer": opt.state_dict(), "rng": rng}
        if mtl_state is not None:
            state["mtl"] = mtl_state
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        save_config(cfg, os.path.join(tmp, "config.yaml"))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = os.path.join(out, "latest")
        prev = open(prev).read().strip() if os.path.isfile(prev) else "none"
        raise RunDirError(f"{tmp or out}: writing {name} failed ({e}); the previous checkpoint ({prev}) is "
                          "intact") from e
    final = os.path.join(out, name)
    if os.path.isdir(final):  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_text_atomic(os.path.join(out, "latest"), name + "\n")
    if checkpoint_is_good(um, out, step, bad_steps):
        write_text_atomic(os.path.join(out, "last_good"), name + "\n")
    protected = {name, _read_name(os.path.join(out, "last_good"))}
    old = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-") and d != name)
    for d in old[:max(0, len(old) - (keep - 1))]:
        if d not in protected:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    return final


def checkpoint_is_good(um: UniMoER, out_dir: str, step: int, bad_steps: int) -> bool:
    """Good = saved outside a bad-step streak, every trainable tensor finite, and, if the dev set was evaluated at
    this step (metrics.jsonl's last line), every metric finite."""
    if bad_steps or not all(bool(torch.isfinite(p).all()) for p in trainable_parameters(um)):
        return False
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
        last = json.loads(lines[-1]) if lines else {}
        if last.get("step") == step and not all(math.isfinite(v) for v in last.values() if isinstance(v, float)):
            return False
    return True


def _read_name(path: str) -> Optional[str]:
    """The checkpoint name a pointer file (`latest`, `last_good`) holds, or None."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def last_good_checkpoint(out_dir: str) -> str:
    """The path of the newest good checkpoint (named by `last_good`), for messages."""
    name = _read_name(os.path.join(out_dir, "last_good"))
    return os.path.join(out_dir, name) if name else f"none (no good checkpoint was saved in {out_dir})"


def load_trainer_state(ckpt: str, um: UniMoER, opt, mtl=None) -> tuple:
    """Restore adapters, head, optimizer and RNG (and train.mtl's method state into `mtl`, an object with
    load_state_dict) from a checkpoint directory -> (step, bad_steps)."""
    check_adapters_match(um.cfg, os.path.join(ckpt, "adapters.safetensors"), "the resumed config")
    moe_lora.load_adapters(um.base, os.path.join(ckpt, "adapters.safetensors"))
    if um.head is not None:
        um.head.load_state_dict(load_file(os.path.join(ckpt, "head.safetensors")))
    if um.nli_head is not None:
        um.nli_head.load_state_dict(load_file(os.path.join(ckpt, NLI_HEAD_FILE)))
    path = os.path.join(ckpt, "trainer_state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: trainer state missing; cannot resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    if mtl is not None:
        if "mtl" not in state:
            raise FileNotFoundError(f"{path}: no train.mtl state (task weights) to resume from")
        mtl.load_state_dict(state["mtl"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(rng["numpy_pos"]), 0, 0.0))
    random.setstate(ast.literal_eval(rng["python"]))
    return state["step"], state["bad_steps"]


def total_steps(cfg: Config) -> int:
    """The steps a run trains: the stages' sum, else train.steps."""
    t = cfg.train
    return sum(st.steps for st in t.stages) if t.stages else t.steps


def latest_step(out_dir: str) -> Optional[int]:
    """The step of the checkpoint `latest` names, or None when the directory has none."""
    name = _read_name(os.path.join(out_dir, "latest"))
    return int(name.rsplit("-", 1)[1]) if name else None


def run_state(cfg: Config) -> str:
    """What train.out_dir holds for this config: "finished" (its `latest` checkpoint is at total_steps(cfg): the
    final save, which follows the final dev evaluation), "started" (a checkpoint before that: continue with
    --resume), "empty" (no checkpoint, but logs or config.yaml of a run killed before its first save: nothing to
    keep, start afresh with --overwrite) or "fresh" (nothing of a run)."""
    out = cfg.train.out_dir
    step = latest_step(out)
    if step is not None:
        return "finished" if step >= total_steps(cfg) else "started"
    if os.path.isdir(out) and any(e in RUN_ENTRIES or e.startswith("checkpoint-") or e == "config.yaml"
                                  for e in os.listdir(out)):
        return "empty"
    return "fresh"


# --------------------------------------------------------------------------------------------- jsonl logs
def truncate_jsonl(path: str, step: int) -> None:
    """Drop lines logged after `step` (by a run killed after its last checkpoint), so a resume does not repeat."""
    if os.path.isfile(path):
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        write_text_atomic(path, "".join(lines))


def append_jsonl(path: str, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # name the file (a full disk's write error carries no path)
        raise OSError(e.errno, e.strerror, path) from None


# --------------------------------------------------------------------------------------------- the run directory
LOCK_FILE = "run.lock"  # flock'ed by the run's rank 0 for its whole life; holds {"pid", "host", "started", "argv"}


RUN_ENTRIES = ("latest", "last_good", "train_log.jsonl", "metrics.jsonl", "routing.jsonl", "resumes.jsonl")


# Keys a --resume may change (fnmatch patterns, list indices as [*]): how long, how often to evaluate and save,
# where, on what device, and the bad-step guards. Everything else (seed, data, batch, lr, model, adapters, ...)
# would make the directory describe a run that was not trained.
RESUMABLE_KEYS = ("train.steps", "train.stages[*].steps", "train.eval_every", "train.save_every", "train.device",
                  "train.max_bad_steps", "train.max_update_rms", "train.rerank_topk", "train.out_dir",
                  "data.dev_queries", "data.dev_corpus", "model.grad_checkpointing", "train.dev_e2rank",
                  "train.e2rank_prf_k", "train.jina_block_size")


class RunDirError(OSError):
    """A run directory that cannot be used as asked: locked by another run, or a checkpoint that cannot be written."""


class RunLock:
    """An exclusive fcntl.flock on <out_dir>/run.lock. The OS drops it when the file is closed or the process dies
    (so a killed run never blocks its resume); the file itself stays, naming the last holder."""

    def __init__(self, out_dir: str, argv: Sequence[str] = ()):
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(self.fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not yet written its name"
            raise RunDirError(f"{out_dir}: in use by another run ({who}; lock file {self.path}); wait for it to "
                              "end or choose another train.out_dir") from None
        self.argv = list(argv)

    def claim(self) -> None:
        """Write this process's name into the lock file: only once the run is accepted, so a refused run leaves
        the directory byte-identical."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": self.argv}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_leftovers(out_dir: str) -> list:
    """Remove the .tmp-* entries of interrupted writes (checkpoints, the tiny base, text files). Only safe under the
    run lock: no other process writes into out_dir then."""
    gone = sorted(e for e in os.listdir(out_dir) if e.startswith(".tmp-"))
    for e in gone:
        path = os.path.join(out_dir, e)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return gone


def clear_for_fresh_run(cfg: Config, overwrite: bool) -> None:
    """A fresh run needs a directory without checkpoints or logs: refuse one that has them (with or without
    `latest`), or with --overwrite delete them. Also drops what a run that never saved could leave (config.yaml,
    the tiny base, rebuilt from this config)."""
    out = cfg.train.out_dir
    found = sorted(e for e in os.listdir(out) if e in RUN_ENTRIES or e.startswith("checkpoint-"))
    if found and not overwrite:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, --overwrite to delete it, "
                              f"or choose another train.out_dir (nothing was changed; found: {', '.join(found[:4])}"
                              f"{', ...' if len(found) > 4 else ''})")
    stale = found + ["config.yaml"] + (["base"] if cfg.model.path is None else [])
    for e in stale:
        path = os.path.join(out, e)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    if found:
        print(f"--overwrite: removed {len(found)} entries of the previous run in {out}", flush=True)


def _flat(x, prefix: str = "") -> dict:
    """{"train.stages[0].steps": 6, "train.stages[#]": 2, ...}: a config mapping as dotted keys, lists of mappings
    by index plus their length under [#]."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flat(val, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(x, list) and all(isinstance(v, dict) for v in x):
        out = {f"{prefix}[#]": len(x)}
        for i, v in enumerate(x):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: x}


def _comparable(cfg: Config) -> dict:
    """cfg as dotted keys, with the tiny base's model.path (<out_dir>/base, set by prepare) as null again; for the
    tiny base model.tokenizer only said where to copy the tokenizer from when base/ was written, so it is left out."""
    d = asdict(cfg)
    if d["model"]["path"] in (None, os.path.join(d["train"]["out_dir"], "base")):
        d["model"]["path"] = d["model"]["tokenizer"] = None
    return _flat(d)


def check_resume_config(cfg: Config) -> dict:
    """Compare the resolved config with the run's own config.yaml -> {key: (old, new)} of allowed changes
    (RESUMABLE_KEYS); any other difference is one ConfigError listing the keys."""
    path = os.path.join(cfg.train.out_dir, "config.yaml")
    old, new = _comparable(load_run_config(path)), _comparable(cfg)
    missing = object()
    changed = {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
               if old.get(k, missing) != new.get(k, missing)}
    show = lambda v: "(none)" if v is missing else (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "...")  # noqa
    frozen = [k for k in changed if not any(fnmatch.fnmatchcase(re.sub(r"\[\d+\]", "[*]", k), pat)
                                           for pat in RESUMABLE_KEYS)]
    if frozen:
        raise ConfigError(f"--resume: the config differs from {path} in keys a resume may not change: "
                          + ", ".join(f"{k} ({show(changed[k][0])} -> {show(changed[k][1])})" for k in frozen)
                          + "; start a fresh run in another train.out_dir to change them")
    return {k: (None if a is missing else a, None if b is missing else b) for k, (a, b) in changed.items()}


def record_resume(cfg: Config, changes: dict) -> None:
    """Log each allowed change, append the resume to <out_dir>/resumes.jsonl ({"step", "time", "changes": {key:
    [old, new]}}) and rewrite config.yaml with the new values, so the directory says what is being trained."""
    out = cfg.train.out_dir
    step = int(_read_name(os.path.join(out, "latest")).rsplit("-", 1)[1])
    for k, (a, b) in changes.items():
        print(f"--resume: {k}: {a!r} -> {b!r}", flush=True)
    append_jsonl(os.path.join(out, "resumes.jsonl"), {
        "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "changes": {k: list(v) for k, v in changes.items()}})
    if changes:
        resolved = copy.deepcopy(cfg)
        if resolved.model.path is None:  # as prepare resolves it
            resolved.model.path, resolved.model.tokenizer = os.path.join(out, "base"), None
        save_config(resolved, os.path.join(out, "config.yaml"))


def _open_run_dir(cfg: Config, resume: bool, overwrite: bool, argv: Sequence[str]) -> RunLock:
    out = cfg.train.out_dir
    if resume and not os.path.isfile(os.path.join(out, "latest")):
        raise FileNotFoundError(f"--resume: {out} has no checkpoint ('latest' file)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{out}: cannot create the run directory ({e.strerror})") from None
    lock = RunLock(out, argv)
    try:  # the checks first: a refused run changes nothing in the directory
        changes = check_resume_config(cfg) if resume else None
        if not resume:
            clear_for_fresh_run(cfg, overwrite)
        lock.claim()
        gone = remove_leftovers(out)
        if gone:
            print(f"removed {len(gone)} leftovers of interrupted writes in {out}: {', '.join(gone)}", flush=True)
        if resume:
            record_resume(cfg, changes)
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def open_run_dir(cfg: Config, resume: bool, overwrite: bool, rank: int, argv: Sequence[str] = ()):
    """Hold train.out_dir for the run: rank 0 takes the lock (RunLock), removes leftovers, and checks the directory
    (fresh: clear_for_fresh_run; --resume: check_resume_config + record_resume). Under DDP rank 0's error is
    broadcast, so every rank raises it instead of waiting at a barrier. The lock is released on leaving."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = _open_run_dir(cfg, resume, overwrite, argv)
        except Exception as e:  # noqa: BLE001  (re-raised below, after the other ranks were told)
            error = e
    if dist.is_initialized():
        msg = [f"{type(error).__name__}: {error}" if error is not None else None]
        dist.broadcast_object_list(msg, src=0)
        if rank != 0 and msg[0] is not None:
            raise RunDirError(f"rank 0 could not open {cfg.train.out_dir}: {msg[0]}")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
