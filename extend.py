"""Experiment 8: a new expert and task on a trained run, without touching what the run learned.

    python train.py configs/tiny.yaml               # the run to extend (ckpt/tiny)
    python train.py configs/tiny_add_nli.yaml       # extend: {from_run: ckpt/tiny, expert: {...}, router: freeze}

config.load_config turns the `extend:` YAML into the whole config (the run's model, data, adapters, router and
train.mode; the extension's train keys). The model is the run's, rebuilt with one more expert (moe_lora.AddedExpert:
its own A / B on its targets, outside the stack) and an NLI head (UniMoER.nli_head); the run's experts, routers and
linear reranking head are loaded strictly from its latest checkpoint (load_from_run: every tensor of the file into
the same name and shape; the only new tensors are the added expert's and, with router grow, the one new row of each
learned router). The optimizer gets only what the extension trains (trainable_parameters): the added expert, the
NLI head, and with grow the grown routers' tensors, whose old rows are held bit-identical (held_slices, through
train.masked_step). Under router freeze the old tasks' calls never run the added expert (its term is skipped) and
their routers are the run's, so their outputs are bit-identical to the run's (tests/test_extend.py).

Reading order: inputs (check_inputs, prepare) -> the model (load_from_run, build_model, trainable_parameters,
held_slices) -> batches and evaluation (batch_inputs, nli_accuracy, dev_nli).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file

import moe_lora
import nli
from config import Config, ConfigError, adapter_config, load_run_config
from router import LearnedRouter
from runs import copy_dir_atomically
from unimoer import UniMoER, build_model as build_run_model, check_adapters_match, checkpoint_dir

GROWN_KEYS = ("proj.weight", "proj.bias", "prototypes", "balance_bias")  # a learned router's per-expert rows


# --------------------------------------------------------------------------------------------- inputs
def nli_path(cfg: Config, split: str) -> str:
    return os.path.join(cfg.extend.data_dir, f"{split}.jsonl")


def check_inputs(cfg: Config, where: str) -> None:
    """Before anything is written: extend.from_run holds a checkpoint (and its tiny base when model.path is the
    run's base), and the NLI files exist and parse (nli.read_nli: a malformed line names file and line) unless
    extend.synthetic will write them."""
    e = cfg.extend
    try:
        checkpoint_dir(e.from_run)
    except FileNotFoundError as err:
        raise ConfigError(f"{where}: extend.from_run: {err}") from None
    if cfg.model.path is None and not os.path.isdir(os.path.join(e.from_run, "base")):
        raise ConfigError(f"{where}: extend.from_run {e.from_run!r}: its tiny base ({e.from_run}/base) is missing")
    if not (e.synthetic and not os.path.isdir(e.data_dir)):
        for split in ("train", "dev"):
            if not os.path.isfile(nli_path(cfg, split)):
                raise ConfigError(f"{where}: extend.data_dir: {nli_path(cfg, split)} not found (extend.synthetic: "
                                  "true writes the built-in synthetic set there)")
            nli.read_nli(nli_path(cfg, split))


def prepare(cfg: Config, out: str) -> None:
    """Rank 0, before building: the synthetic NLI set (extend.synthetic) and a copy of the run's tiny base into the
    new run (model.path null: <out_dir>/base, as a fresh tiny run has it)."""
    e = cfg.extend
    if e.synthetic and not (os.path.isdir(e.data_dir) and os.listdir(e.data_dir)):
        try:
            nli.make_synthetic_nli(e.data_dir, seed=e.synthetic_seed, **e.synthetic_args)
        except TypeError as err:
            raise ConfigError(f"extend.synthetic_args: {err}") from None
    if cfg.model.path is None and not os.path.isdir(os.path.join(out, "base")):
        copy_dir_atomically(os.path.join(e.from_run, "base"), os.path.join(out, "base"))


# --------------------------------------------------------------------------------------------- the model
def load_from_run(um: UniMoER, from_run: str) -> str:
    """Copy the run's adapter tensors (and linear reranking head) into the extended model, strictly: the file must
    be the run's own spec (unimoer.check_adapters_match with the run's config.yaml) and that spec must be this
    model's without the added expert; every tensor goes to the same name with the same shape, except a grown
    learned router's per-expert tensors (GROWN_KEYS), which fill all rows but the new last one. A key the model
    lacks, or a model key the file lacks other than the added expert's, is an error. -> the checkpoint read."""
    ckpt = checkpoint_dir(from_run)
    path, cfg_path = os.path.join(ckpt, "adapters.safetensors"), os.path.join(ckpt, "config.yaml")
    run_cfg = load_run_config(cfg_path)
    check_adapters_match(run_cfg, path, cfg_path)
    if adapter_config(um.cfg, with_added=False).to_dict() != adapter_config(run_cfg).to_dict():
        raise ValueError(f"{path}: the extension's config does not rebuild the experts of {cfg_path}")
    old, new = load_file(path), moe_lora.adapter_state_dict(um.base)
    added = {k for k in new if k.endswith((".add_A", ".add_B"))}
    grow = moe_lora.get_config(um.base).added.routing == "grow"
    missing = sorted(set(new) - set(old) - added)
    unexpected = sorted(set(old) - set(new))
    if missing or unexpected:
        raise ValueError(f"{path}: the run's adapters do not match the extended model; missing: {missing[:10]}; "
                         f"unexpected: {unexpected[:10]}")
    with torch.no_grad():
        for k, t in old.items():
            target = new[k]
            if target.shape == t.shape:
                target.copy_(t)
            elif grow and k.endswith(GROWN_KEYS) and target.shape[1:] == t.shape[1:] \
                    and target.shape[0] == t.shape[0] + 1:
                target[:t.shape[0]].copy_(t)  # the old rows; the last (the added expert's) keeps its init
            else:
                raise ValueError(f"{path}: tensor {k!r} has shape {list(t.shape)}, the extended model expects "
                                 f"{list(target.shape)}")
    if um.head is not None:
        um.head.load_state_dict(load_file(os.path.join(ckpt, "head.safetensors")))
    return ckpt


def build_model(cfg: Config, device: torch.device) -> UniMoER:
    """The run's model with the added expert and the NLI head (unimoer.build_model with cfg.extend), the run's
    tensors loaded (load_from_run), and everything the extension does not train set requires_grad False."""
    um = build_run_model(cfg, device)
    load_from_run(um, cfg.extend.from_run)
    train = {id(p) for p in trainable_parameters(um)}
    for p in um.parameters():
        if id(p) not in train:
            p.requires_grad_(False)
    return um


def grown_routers(um: UniMoER) -> list:
    """[(LearnedRouter, number of old columns)] of a grown model (extend.router grow), else []."""
    spec = moe_lora.get_config(um.base)
    if spec.added is None or spec.added.routing != "grow":
        return []
    return [(m.router, m.n_routed) for m in um.base.modules()
            if isinstance(m, moe_lora.MoEHook) and isinstance(m.router, LearnedRouter)]


def trainable_parameters(um: UniMoER) -> list:
    """What an extension trains: the added expert's A and B, the NLI head, and (grow) each grown router's scorer
    (its old rows held by held_slices)."""
    out = [p for m in um.base.modules() if isinstance(m, moe_lora.MoELoRALinear) and m.add_A is not None
           for p in (m.add_A, m.add_B)]
    for r, _ in grown_routers(um):
        out += [r.proj.weight, r.proj.bias] if r.proj is not None else [r.prototypes]
    return out + list(um.nli_head.parameters())


def held_slices(um: UniMoER) -> list:
    """[(tensor, index)] the optimizer must leave as they are (train.masked_step): each grown router's old rows."""
    out = []
    for r, n in grown_routers(um):
        tensors = [r.proj.weight, r.proj.bias] if r.proj is not None else [r.prototypes]
        out += [(t, (slice(0, n),) + (slice(None),) * (t.dim() - 1)) for t in tensors]
    return out


# --------------------------------------------------------------------------------------------- batches, evaluation
def batch_inputs(um: UniMoER, examples: Sequence[dict]) -> dict:
    """NLI examples -> UniMoER.forward's inputs: the token batch and the labels."""
    return {"nli": um.tokens_nli([e["premise"] for e in examples], [e["hypothesis"] for e in examples]),
            "nli_labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


@torch.no_grad()
def nli_predictions(um: UniMoER, examples: Sequence[dict], batch_size: int = 64) -> np.ndarray:
    """(n,) predicted class indices (argmax of the logits), in eval mode."""
    was_training = um.training
    um.eval()
    try:
        preds = [um.nli_logits(batch_inputs(um, examples[i:i + batch_size])["nli"])[0].argmax(-1).cpu()
                 for i in range(0, len(examples), batch_size)]
    finally:
        um.train(was_training)
    return torch.cat(preds).numpy() if preds else np.zeros((0,), dtype=np.int64)


def nli_accuracy(um: UniMoER, examples: Sequence[dict], batch_size: int = 64) -> float:
    preds = nli_predictions(um, examples, batch_size)
    return float(np.mean(preds == np.array([e["label"] for e in examples]))) if len(examples) else float("nan")


def load_nli_dev(cfg: Config, cut: bool = True) -> tuple:
    """(train examples, dev examples) of the extension's data; cut: the first extend.dev_examples of dev (training's
    dev evaluation), else all (evaluate.py)."""
    dev = nli.read_nli(nli_path(cfg, "dev"))
    n = cfg.extend.dev_examples if cut else 0
    return nli.read_nli(nli_path(cfg, "train")), dev[:n] if n else dev


def dev_nli(um: UniMoER, data: tuple) -> dict:
    """The added task's dev figures: accuracy, next to always answering the training set's majority label."""
    train, dev = data
    return {"nli_accuracy": nli_accuracy(um, dev), "nli_majority": nli.majority_accuracy(train, dev),
            "nli_dev_examples": len(dev)}
