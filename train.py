"""Train UniMoER: one frozen decoder + LoRA experts for dense retrieval (embedding) and reranking.

    python train.py configs/tiny.yaml                                   # CPU, built-in synthetic task, minutes
    python train.py configs/tiny.yaml --train.lr=5e-4 --train.steps=50  # overrides: --section.key=value (YAML)
    python train.py configs/tiny.yaml --resume                          # continue from <out_dir>'s latest checkpoint
    python train.py configs/tiny.yaml --overwrite                       # delete the run in <out_dir>, start afresh
    python train.py configs/tiny.yaml --debug                           # a bad input's traceback (else: one line)
    python train.py configs/qwen3_4b.yaml --dry-run --gpus=8            # parameters, memory per GPU (dryrun.py)
    torchrun --nproc_per_node=8 train.py configs/joint_moe.yaml         # DDP (nccl on GPU, gloo on CPU)

Reading order: check_inputs -> the training loop: one step (forward_backward, GradCache for grad_accum > 1;
optimizer_step, holding untrained experts), setup (prepare, setup_run), train_step, main. The config is config.py's,
the model unimoer.py's, the losses losses.py's, the run directory and checkpoints runs.py's, the dev evaluation
evaluate.py's.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import dryrun
import extend
import moe_lora
import mtl
import nli
import quant
import synthetic
from config import EXTEND_TASK, Config, ConfigError, Stage, check_rule, load_config, mode_tasks
from evaluate import dev_evaluate, dev_routing_texts, load_dev
from losses import TASK_WEIGHT_KEYS, aux_losses, aux_terms, logged_values, task_losses, total_loss
from model import UsageError, load_tokenizer, run_cli
from runs import (append_jsonl, copy_dir_atomically, last_good_checkpoint, load_trainer_state, open_run_dir,
                  save_checkpoint, save_config, tiny_base_cache_dir, total_steps, truncate_jsonl, write_tiny_base)
from unimoer import (UniMoER, autocast_for, batch_inputs, build_model, check_lengths, checkpoint_dir,
                     has_learned_router, pilot_inputs, routing_snapshot, setup_distributed, trainable_parameters)


# ------------------------------------------------------------------------------------------------ inputs
def check_inputs(cfg: Config, where: str) -> None:
    """What the run reads, checked before anything is written: the model and tokenizer directories, the data
    files (unless data.synthetic will write them), adapters.layers against the model's depth, and the lengths
    against the templates (check_lengths) when the tokenizer is already there."""
    m, d = cfg.model, cfg.data
    if m.path is not None:
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ConfigError(f"{where}: model.path {m.path!r}: not a model directory (no config.json)")
        if cfg.adapters.layers is not None:
            try:
                with open(os.path.join(m.path, "config.json")) as f:
                    n = json.load(f).get("num_hidden_layers")
            except (json.JSONDecodeError, AttributeError):
                raise ConfigError(f"{where}: model.path {m.path!r}: config.json is not a JSON object") from None
            check_rule(where, "adapters.layers", cfg.adapters.layers, n is None or max(cfg.adapters.layers) < n,
                   f"layer indices < {n}, the depth of {m.path}")
        quant.check_setting(m.path, m.quant, m.quant_group, where)  # model.quant against the directory
        if cfg.train.matryoshka_dims:
            check_matryoshka_width(cfg, where)
    if m.tokenizer is not None and not os.path.exists(m.tokenizer):
        raise ConfigError(f"{where}: model.tokenizer {m.tokenizer!r}: not found")
    if not (d.synthetic and not os.path.isdir(d.dir)):
        if not os.path.isdir(d.dir):
            raise ConfigError(f"{where}: data.dir {d.dir!r}: directory not found (data.synthetic: true writes the "
                              "built-in task there)")
        train_file = d.train_file or os.path.join(d.dir, "train.jsonl")
        for key, path in (("data.dir", os.path.join(d.dir, "corpus.jsonl")),
                          ("data.dir", os.path.join(d.dir, "queries.jsonl")),
                          ("data.dev_split", os.path.join(d.dir, "qrels", f"{d.dev_split}.tsv")),
                          ("data.train_file", train_file)):
            if not os.path.isfile(path):
                raise ConfigError(f"{where}: {key}: {path} not found")
    if cfg.extend is not None:
        extend.check_inputs(cfg, where)
        if m.path is None:  # the run's tiny base, copied into the new run by prepare
            m = dataclasses.replace(m, path=os.path.join(cfg.extend.from_run, "base"))
    tok_source = m.tokenizer or m.path or d.dir
    if os.path.isfile(tok_source) or os.path.isfile(os.path.join(tok_source, "tokenizer.json")):
        check_lengths(cfg, load_tokenizer(tok_source), where)


def check_matryoshka_width(cfg: Config, where: str) -> None:
    """train.matryoshka_dims against the embedding width (hidden_size of model.path's config.json)."""
    path = os.path.join(cfg.model.path, "config.json")
    try:
        with open(path) as f:
            h = json.load(f).get("hidden_size")
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{where}: model.path {cfg.model.path!r}: config.json is not a JSON object") from None
    dims = cfg.train.matryoshka_dims
    check_rule(where, "train.matryoshka_dims", dims, h is None or max(dims) <= h,
               f"dims <= {h}, the hidden size of {cfg.model.path}")


# ------------------------------------------------------------------------------------------------ run files
def summary_line(metrics_path: str, out_dir: str, seconds: float) -> str:
    """One line at the end of a run: where it is, and the first and last dev evaluation (nDCG@10)."""
    with open(metrics_path) as f:
        rows = [json.loads(x) for x in f if x.strip()]

    def figures(m: dict) -> str:
        recall = next((f"{k} {v:.3f}" for k, v in m.items() if k.startswith("cand_recall@")), "")
        return (f"retrieval {m['emb_ndcg@10']:.3f}, rerank fixed {m['fixed_ndcg@10']:.3f} (candidates "
                f"{m['cand_ndcg@10']:.3f}, {recall}), two-stage {m['rerank_ndcg@10']:.3f}")

    def added(m: dict) -> str:  # an extension's task
        return f"; nli accuracy {m['nli_accuracy']:.3f} (majority {m['nli_majority']:.3f})" if "nli_accuracy" in m \
            else ""

    return (f"done: {out_dir} in {seconds:.0f} s | dev nDCG@10 step {rows[0]['step']}: {figures(rows[0])}"
            f"{added(rows[0])} | step {rows[-1]['step']}: {figures(rows[-1])}{added(rows[-1])}")


def train_examples(cfg: Config) -> list:
    """data.train_file (default <data.dir>/train.jsonl): training JSONL, or MS MARCO triples if it ends in .tsv."""
    path = cfg.data.train_file or os.path.join(cfg.data.dir, "train.jsonl")
    return data.read_triples_tsv(path) if path.endswith(".tsv") else data.read_train_jsonl(path)


# ------------------------------------------------------------------------------------------------ the loop
def snapshot_update(params: Sequence[torch.Tensor], opt) -> tuple:
    """(parameter copies, optimizer state copy) taken before opt.step(), for undo_update."""
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def update_is_sane(params: Sequence[torch.Tensor], before: tuple, max_update_rms: Optional[float]) -> bool:
    """The step left every parameter finite and its update RMS = sqrt(sum_i (p_i - p0_i)^2 / N) over all N
    trainable elements (float64, so a huge update does not overflow) is at most max_update_rms (None: no bound)."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return False
    if max_update_rms is None:
        return True
    sq = sum(float((p.detach().double() - p0.double()).pow(2).sum()) for p, p0 in zip(params, before[0]))
    n = sum(p.numel() for p in params)
    return math.isfinite(sq) and math.sqrt(sq / max(1, n)) <= max_update_rms


def undo_update(params: Sequence[torch.Tensor], opt, before: tuple) -> None:
    with torch.no_grad():
        for p, p0 in zip(params, before[0]):
            p.copy_(p0)
    opt.load_state_dict(before[1])


def lr_at(step: int, cfg: Config) -> tuple:
    """-> (lr, stage index) for optimizer step `step` (0-based): per stage, linear warmup then cosine decay."""
    t = cfg.train
    stages = t.stages or [Stage(steps=t.steps)]
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps or i == len(stages) - 1:
            s, n, peak = step - start, st.steps, st.lr if st.lr is not None else t.lr
            if s < t.warmup_steps:
                return peak * (s + 1) / t.warmup_steps, i
            progress = (s - t.warmup_steps) / max(1, n - t.warmup_steps)
            return peak * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))), i
        start += st.steps


def tasks_at(step: int, stage: Stage, cfg: Config) -> list:
    allowed = [x for x in mode_tasks(cfg.train.mode) if stage.tasks in ("both", x)]
    if cfg.train.schedule == "alternate" and len(allowed) > 1:
        return [allowed[step % len(allowed)]]
    return allowed


def frozen_slices(um: UniMoER, names: Sequence[str]) -> list:
    """[(tensor, index)] of the rank slots of the named experts in every MoE linear (rows of A, columns of B)."""
    out = []
    for m in um.base.modules():
        if isinstance(m, moe_lora.MoELoRALinear):
            for n in names:
                if n not in m.expert_names:
                    raise ConfigError(f"freeze_experts: no expert {n!r} (experts: {m.expert_names})")
                sl = m.expert_slice(n)
                out += [(m.lora_A, (sl, slice(None))), (m.lora_B, (slice(None), sl))]
    return out


def untrained_experts(um: UniMoER, tasks: Sequence[str], frozen: Sequence[str]) -> list:
    """Names of the experts a step with these tasks does not train: the frozen ones, and those none of its tasks
    can reach. Reach follows from the structure, not from gradient values: a task router (task-routed modes)
    gives each task its router.task_experts, an always-on shared expert serves every task, and a learned router
    reaches every routed expert. With rerank_head e2rank a rerank step also reaches the embed task's experts (its
    documents are embedded under the embed routing)."""
    spec = moe_lora.get_config(um.base)
    unknown = [n for n in frozen if n not in [e.name for e in spec.experts]]
    if unknown:
        raise ConfigError(f"freeze_experts: no expert {unknown[0]!r} (experts: {[e.name for e in spec.experts]})")
    if um.cfg.train.rerank_head == "e2rank" and "rerank" in tasks:  # E2Rank embeds the documents under embed routing
        tasks = list(tasks) + ["embed"]
    reached = set().union(*(mtl.experts_reached(spec, task) for task in tasks))
    return [e.name for e in spec.experts if e.name in frozen or e.name not in reached]


def masked_step(opt: torch.optim.Optimizer, held: Sequence[tuple]) -> None:
    """opt.step() that leaves the slices `held` [(tensor, index)] (rows of A, columns of B of the experts the step
    does not train) bit-identical, their optimizer state included.

    The experts of a linear share one lora_A / lora_B, so an untrained expert's zero gradient would still move
    it: AdamW decays its moments (m <- beta1 m, v <- beta2 v), steps by m_hat / (sqrt(v_hat) + eps) from the
    old moments, and applies the decoupled weight decay. So the slices of the parameter and of each per-element
    state tensor (exp_avg, exp_avg_sq; max_exp_avg_sq under amsgrad) are saved before the step and written back
    after it (a state tensor this step created starts at zero there). AdamW's step counter t is one per tensor,
    so it also counts the steps an expert was held: its bias corrections 1 - beta^t use the tensor's t, not its
    own number of updates (a difference that fades as beta^t -> 0, within ~1/(1 - beta2) steps).
    """
    saved = []
    for tensor, idx in held:
        state = opt.state.get(tensor, {})
        moments = {k: v[idx].clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == tensor.shape}
        saved.append((tensor, idx, tensor.detach()[idx].clone(), moments))
    opt.step()
    with torch.no_grad():
        for tensor, idx, value, moments in saved:
            tensor[idx] = value
            for k, v in opt.state.get(tensor, {}).items():
                if torch.is_tensor(v) and v.shape == tensor.shape:
                    v[idx] = moments[k] if k in moments else 0


def optimizer_step(opt: torch.optim.Optimizer, params: list, held: Sequence[tuple], finite: bool, clip: float,
                   world: int, max_update_rms: Optional[float] = None) -> bool:
    """Clip and apply the step's gradients, the held slices excluded from the norm and the update (masked_step).
    A non-finite loss or gradient on any rank skips the update on all; an update that leaves a parameter
    non-finite or moves them by more than max_update_rms (update_is_sane) is undone, parameters and optimizer
    state -> whether the update was applied (a skipped or undone step is a bad step)."""
    for tensor, idx in held:
        if tensor.grad is not None:
            tensor.grad[idx] = 0
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    ok = torch.tensor(float(finite and bool(torch.isfinite(grad_norm))), device=params[0].device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() > 0:
        before = snapshot_update(params, opt)
        masked_step(opt, held)
        if not update_is_sane(params, before, max_update_rms):  # the same on every rank: the same update
            undo_update(params, opt, before)
            ok.zero_()
    opt.zero_grad(set_to_none=True)
    return ok.item() > 0


# ---- one step's loss and gradient
def step_outputs(outs: Sequence[dict], cfg: Config) -> dict:
    """One optimizer step's chunks' forward outputs -> losses.total_loss's `out`.

    The chunks' embeddings and scores are concatenated (query i's documents stay at rows i * g...), so InfoNCE
    sees every chunk's documents as negatives and the rerank loss is the mean over the whole step; the aux losses
    are finalised over train.aux_scope's units (aux_losses)."""
    out = {k: torch.cat([o[k] for o in outs]) for k in ("q", "d", "scores", "nli_logits", "nli_labels")
           if k in outs[0]}
    out["aux"] = aux_losses([c for o in outs for c in o["aux_calls"]], cfg.train.aux_scope)
    return out


def step_loss(outs: Sequence[dict], cfg: Config, group: int, task_weights=None) -> tuple:
    """The loss of one optimizer step from its chunks' forward outputs -> total_loss's (loss, log)."""
    out = step_outputs(outs, cfg)
    return total_loss(out, cfg, group) if task_weights is None else total_loss(out, cfg, group, task_weights)


def forward_backward(model: nn.Module, um: UniMoER, chunks: Sequence[dict], cfg: Config, group: int,
                     autocast=contextlib.nullcontext, method=None, masks: Optional[list] = None) -> tuple:
    """The step's loss over all its chunks (UniMoER.forward inputs) and its gradient, accumulated into the
    parameters' .grad -> (finite, {name: value} for the log). model is um or its DDP wrapper; autocast a
    context-manager factory for the forwards. One chunk: forward, backward. More: gradcache_backward.

    method (train.mtl, mtl.build_method) acts on a step with both tasks: PCGrad / GradNorm take per-task gradients
    (mtl_backward; masks: mtl.shared_masks of the step), FAMO weighs the task losses (total_loss's task_weights,
    also under GradCache). A step with one task is the plain step."""
    both = method is not None and {"queries", "pairs"} <= set(chunks[0])
    if both and method.per_task_gradients:
        return mtl_backward(model, um, chunks[0], cfg, group, autocast, method, masks)
    weights = method.task_weights if both else None
    if len(chunks) > 1:
        finite, logs = gradcache_backward(model, um, chunks, cfg, group, autocast, weights)
    else:
        with autocast():
            out = model(**chunks[0])
        loss, logs = step_loss([out], cfg, group, weights)
        loss.backward()
        finite = bool(torch.isfinite(loss))
    return finite, {**logs, **(method.step_log if both else {})}


def mtl_backward(model: nn.Module, um: UniMoER, chunk: dict, cfg: Config, group: int, autocast, method,
                 masks: list) -> tuple:
    """PCGrad / GradNorm on one forward: the task losses alpha L_emb, beta L_rank and the aux terms go to
    method.backward, which takes their gradients and sets .grad. Under DDP the forward runs in no_sync and the
    method averages its gradients over the ranks itself (mtl.mean_over_ranks) -> as forward_backward."""
    with contextlib.nullcontext() if model is um else model.no_sync():
        with autocast():
            out = model(**chunk)
        parts = task_losses(step_outputs([out], cfg), cfg, group)
        tasks = {k: getattr(cfg.train, w) * parts[k] for k, w in TASK_WEIGHT_KEYS.items()}
        method.backward(tasks, aux_terms(parts, cfg), trainable_parameters(um), masks, um)
    finite = all(bool(torch.isfinite(v)) for v in parts.values())
    return finite, {**logged_values(parts, cfg), **method.step_log}


def step_task_losses(um: UniMoER, chunks: Sequence[dict], cfg: Config, group: int,
                     autocast=contextlib.nullcontext) -> dict:
    """The step's losses (losses.task_losses) on its chunks without grad: FAMO's L(theta_{t+1}) after the update
    (train.famo_delta same_batch), in train mode as the official trainers (dropout and jitter drawn)."""
    with torch.no_grad():
        outs = []
        for chunk in chunks:
            with autocast():
                outs.append(um(**chunk))
        return task_losses(step_outputs(outs, cfg), cfg, group)


def gradcache_backward(model: nn.Module, um: UniMoER, chunks: Sequence[dict], cfg: Config, group: int,
                       autocast=contextlib.nullcontext, task_weights=None) -> tuple:
    """GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
    the exact gradient of the loss over all chunks together, with one chunk's activations in memory at a time.

    1. Representation pass without grad: each chunk's outputs r_k (embeddings q, d, rerank scores, and the
       routers' aux-statistic totals; counts and dispatch sums are constants), keeping the RNG state before it.
    2. L = step_loss(r_1..r_K) on the whole step and G_k = dL/dr_k, by autograd with the r_k as leaves.
    3. Per chunk: re-forward with grad from the kept RNG state (GradCache's RandContext: the same adapter
       dropout and router jitter), then backward of sum <r_k, G_k>; by the chain rule the parameter gradients add
       up to dL/dtheta. Under DDP only the last chunk's backward all-reduces (no_sync before it).
    Cost: one more forward per chunk (without grad, ~1/3 of a forward + backward); memory: one chunk's
    activations plus the step's r_k. The global RNG ends where pass 1 left it. task_weights: total_loss's.
    """
    devices = [um._device()] if um._device().type == "cuda" else []
    states, raw = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(devices))
            with autocast():
                raw.append(um(**chunk))
    cached = [_as_leaves(out) for out in raw]
    loss, logs = step_loss(cached, cfg, group, task_weights)
    loss.backward()
    with torch.random.fork_rng(devices=devices):
        for k, (chunk, state, leaves) in enumerate(zip(chunks, states, cached)):
            _set_rng_state(state, devices)
            last = k == len(chunks) - 1
            with contextlib.nullcontext() if model is um or last else model.no_sync():
                with autocast():
                    out = model(**chunk)
                _cached_grad_dot(out, leaves).backward()
    return bool(torch.isfinite(loss)), logs


def _as_leaves(out: dict) -> dict:
    """A no-grad forward output as leaf tensors that require grad (GradCache's cached representations)."""
    leaves = {k: out[k].detach().requires_grad_() for k in ("q", "d", "scores") if k in out}
    leaves["aux_calls"] = [{name: [dataclasses.replace(st, total=st.total.detach().requires_grad_(),
                                                       dispatch=_dispatch_leaf(st, name))
                                   for st in layers] for name, layers in call.items()} for call in out["aux_calls"]]
    return leaves


def _dispatch_leaf(st, name: str):
    """A dispatch sum as GradCache caches it: a constant (Switch's f), or a leaf requiring grad where f is
    differentiable (AuxStat.dispatch_grad: DynMoLE's f = mean routed weight)."""
    if st.dispatch is None or not st.dispatch_grad:
        return st.dispatch
    return st.dispatch.detach().requires_grad_()


def _cached_grad_dot(out: dict, leaves: dict) -> torch.Tensor:
    """sum over a chunk's outputs r of <r, dL/dr> (dL/dr = the cached leaf's .grad; unused outputs skipped)."""
    pairs = [(out[k], leaves[k]) for k in ("q", "d", "scores") if k in leaves]
    for call, cached in zip(out["aux_calls"], leaves["aux_calls"]):
        pairs += [(st.total, c.total) for name in cached for st, c in zip(call[name], cached[name])]
        pairs += [(st.dispatch, c.dispatch) for name in cached for st, c in zip(call[name], cached[name])
                  if c.dispatch is not None and c.dispatch.requires_grad]
    return sum(((r * leaf.grad).sum() for r, leaf in pairs if leaf.grad is not None), torch.zeros(()))


def _rng_state(devices: list) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: list) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


def prepare(cfg: Config, rank: int) -> Config:
    """Rank 0 writes what the run needs before building (synthetic data, the tiny base); returns the resolved
    config (model.path filled in)."""
    d, out = cfg.data, cfg.train.out_dir
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if d.synthetic and not (os.path.isdir(d.dir) and os.listdir(d.dir)):  # atomic: present means complete
            try:
                synthetic.make_synthetic(d.dir, seed=d.synthetic_seed, **d.synthetic_args)
            except TypeError as e:
                raise ConfigError(f"data.synthetic_args: {e}") from None
        if cfg.extend is not None:  # the NLI set, and the extended run's tiny base copied from it
            extend.prepare(cfg, out)
        if cfg.model.path is None and not os.path.isdir(os.path.join(out, "base")):
            if cfg.model.tiny.pretrain_steps > 0:  # pretrained once per (data, tiny config), then copied
                cache = tiny_base_cache_dir(cfg)
                if not os.path.isdir(cache):
                    write_tiny_base(cfg, cache)
                copy_dir_atomically(cache, os.path.join(out, "base"))
            else:
                write_tiny_base(cfg, os.path.join(out, "base"))
    if dist.is_initialized():
        dist.barrier()
    if cfg.model.path is None:
        cfg.model.path = os.path.join(out, "base")
        cfg.model.tokenizer = None
    return cfg


def main(argv: Sequence[str]) -> None:
    if "--dry-run" in argv:  # the model on the meta device: counts and memory, nothing read or written
        return dryrun.main([a for a in argv if a != "--dry-run"])
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    if not args or args[0].startswith("--"):
        raise UsageError("usage: python train.py CONFIG.yaml [--section.key=value ...] [--resume | --overwrite] "
                         "[--dry-run [--gpus=N]] [--debug]")
    cfg = load_config(args[0], args[1:])
    check_inputs(cfg, args[0] + (" (with overrides)" if args[1:] else ""))
    resume, overwrite = "--resume" in argv, "--overwrite" in argv
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir, --overwrite deletes it: pass one of them")
    t = cfg.train
    rank, world, device, _ = setup_distributed(t.device)
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(f"train.batch_size {t.batch_size} must divide by world_size * grad_accum = "
                          f"{world} * {t.grad_accum}")
    with open_run_dir(cfg, resume, overwrite, rank, argv):  # the lock on out_dir, held until the run ends
        train_run(cfg, resume, rank, world, device)


@dataclasses.dataclass
class RunState:
    """What the loop works with, set up once by setup_run; step and bad_steps advance in train_step."""
    cfg: Config
    um: UniMoER
    model: nn.Module  # um, or its DDP wrapper
    params: list
    opt: torch.optim.Optimizer
    examples: list
    sampler: data.TrainSampler
    total_steps: int
    dev: Optional[tuple]  # rank 0: the dev set (load_dev)
    routing_texts: Optional[tuple]  # rank 0 with a learned router: routing_snapshot's texts
    rank: int
    world: int
    nli_dev: Optional[tuple] = None  # an extension, rank 0: its NLI (train, dev) examples (extend.load_nli_dev)
    step: int = 0
    bad_steps: int = 0
    mtl: object = None  # train.mtl's method (mtl.build_method), its state in the trainer state

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.train.out_dir, name)


LOGS = ("metrics.jsonl", "train_log.jsonl", "routing.jsonl")  # routing.jsonl only when a learned router exists


def train_run(cfg: Config, resume: bool, rank: int, world: int, device: torch.device) -> None:
    """The run itself, inside open_run_dir: setup (setup_run), the loop of train_step with dev evaluations and
    checkpoints, and the summary line."""
    t_start = time.time()  # the summary line's wall time: setup (data, tiny base) included
    run = setup_run(cfg, resume, rank, world, device)
    t = run.cfg.train
    autocast = autocast_for(device, t.bf16_autocast)
    bar = tqdm(total=run.total_steps, initial=run.step, disable=rank != 0, desc="train", dynamic_ncols=True)
    while run.step < run.total_steps:
        t0 = time.time()
        lr, tasks, ok, logs = train_step(run, autocast)
        if rank == 0:
            append_jsonl(run.path("train_log.jsonl"), {"step": run.step, "lr": lr, "tasks": tasks,
                                                         "skipped": not ok, **logs})
            bar.update(1)
            bar.write(f"step {run.step}/{run.total_steps} | loss " + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                      + f" | lr {lr:.2e} | {time.time() - t0:.2f}s" + (" | SKIPPED (bad)" if not ok else ""))
            if run.step % t.eval_every == 0 or run.step == run.total_steps:
                bar.write(f"step {run.step} dev: {json.dumps(evaluate_and_log(run))}")
        if (run.step % t.save_every == 0 or run.step == run.total_steps) and run.bad_steps == 0:
            save(run)  # never inside a bad streak
    bar.close()
    if rank == 0:
        print(summary_line(run.path("metrics.jsonl"), t.out_dir, time.time() - t_start), flush=True)
    if world > 1:
        dist.destroy_process_group()


def setup_run(cfg: Config, resume: bool, rank: int, world: int, device: torch.device) -> RunState:
    """Everything before the first step: the files the run needs (prepare), seeds, the model and optimizer,
    RouterRetriever's pilots, the sampler and dev set; then either the resumed trainer state (logs cut back to
    its step) or a fresh start (config.yaml, logs cleared, the step-0 dev evaluation)."""
    t = cfg.train
    cfg = prepare(cfg, rank)
    random.seed(t.seed)
    np.random.seed(t.seed)
    ext = cfg.extend is not None  # an extension (extend.py): the run's model + one expert, the NLI task alone
    um = extend.build_model(cfg, device) if ext else build_model(cfg, device)
    model = nn.parallel.DistributedDataParallel(um, find_unused_parameters=True) if world > 1 else um
    params = extend.trainable_parameters(um) if ext else trainable_parameters(um)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    examples = nli.read_nli(extend.nli_path(cfg, "train")) if ext else train_examples(cfg)
    if cfg.router.kind == "retriever" and not ext:  # RouterRetriever's pilots (joint_moe / no_shared: MODE_TABLE)
        moe_lora.set_pilot_embeddings(um.base, pilot_inputs(um, examples))  # frozen base: the same on resume
    per_micro = t.batch_size // t.grad_accum  # the sampler's global batch is one micro-step over all ranks
    if ext:  # the NLI batches: nli.batch_indices, the same epoch-permutation rule
        nli.batch_indices(len(examples), per_micro, t.seed, 0, rank, world)  # one batch must fit (a DataError)
        sampler = None
    else:
        sampler = data.TrainSampler(examples, per_micro, cfg.data.n_neg, t.seed, rank, world)
    dev = load_dev(cfg) if rank == 0 else None
    total = total_steps(cfg)
    routing_texts = dev_routing_texts(dev) if rank == 0 and has_learned_router(um) else None
    run = RunState(cfg, um, model, params, opt, examples, sampler, total, dev, routing_texts, rank, world,
                   mtl=mtl.build_method(cfg, device), nli_dev=extend.load_nli_dev(cfg) if ext and rank == 0 else None)
    if resume:
        run.step, run.bad_steps = load_trainer_state(checkpoint_dir(t.out_dir), um, opt, run.mtl)
        if rank == 0:
            for name in LOGS:
                truncate_jsonl(run.path(name), run.step)
    elif rank == 0:
        save_config(cfg, run.path("config.yaml"))
        for name in LOGS:
            if os.path.exists(run.path(name)):
                os.remove(run.path(name))
        print(f"step 0 dev: {json.dumps(evaluate_and_log(run))}", flush=True)
    return run


def train_step(run: RunState, autocast) -> tuple:
    """One optimizer step: its lr and stage, the tasks it trains, the experts it holds, the forward and backward
    over its grad_accum chunks, and the guarded update; advances run.step (and run.bad_steps) -> (lr, tasks,
    whether the update was applied, the losses for the log). max_bad_steps bad steps in a row: NonFiniteError."""
    cfg, um, t, step = run.cfg, run.um, run.cfg.train, run.step
    lr, si = lr_at(step, cfg)
    stage = (t.stages or [Stage(steps=t.steps)])[si]
    for gr in run.opt.param_groups:
        gr["lr"] = lr
    um.train()
    if cfg.extend is not None:  # an extension: the NLI task alone, the grown routers' old rows held
        tasks, held = [EXTEND_TASK], extend.held_slices(um)
        idx = nli.batch_indices(len(run.examples), t.batch_size, t.seed, step, run.rank, run.world)
        chunks = [extend.batch_inputs(um, [run.examples[i] for i in idx])]
    else:
        tasks = tasks_at(step, stage, cfg)
        held = frozen_slices(um, untrained_experts(um, tasks, list(t.freeze_experts) + list(stage.freeze_experts)))
        chunks = [batch_inputs(um, data.gather_texts(run.examples, run.sampler.batch(step * t.grad_accum + micro)),
                               tasks) for micro in range(t.grad_accum)]  # the step's batch; GradCache chunks
    group, method = 1 + cfg.data.n_neg, (run.mtl if len(tasks) > 1 else None)  # one task: the plain step
    masks = mtl.shared_masks(um, run.params, tasks, held) if method is not None and method.per_task_gradients else None
    finite, logs = forward_backward(run.model, um, chunks, cfg, group, autocast, method, masks)
    ok = optimizer_step(run.opt, run.params, held, finite, t.clip, run.world, t.max_update_rms)
    if ok and method is not None:  # the task weights move on applied steps only
        method.after_step(lambda: step_task_losses(um, chunks, cfg, group, autocast))
    logs.update(moe_lora.update_balance_bias(um.base, run.world, apply=ok))  # router.loss_free_balance (else {})
    run.bad_steps = 0 if ok else run.bad_steps + 1
    if run.bad_steps >= t.max_bad_steps:
        raise NonFiniteError(f"{run.bad_steps} bad steps in a row (non-finite loss or gradient, or an update that "
                             f"was non-finite or above train.max_update_rms; last: step {step + 1}); stopping. The "
                             f"last good checkpoint is {last_good_checkpoint(t.out_dir)}")
    run.step += 1
    return lr, tasks, ok, logs


def evaluate_and_log(run: RunState) -> dict:
    """Rank 0: a dev evaluation at run.step, appended to metrics.jsonl (and a routing snapshot to routing.jsonl)."""
    m = {"step": run.step, **dev_evaluate(run.um, run.dev, run.cfg)}
    if run.nli_dev is not None:  # an extension: the old tasks above (unchanged under freeze), the new one here
        m.update(extend.dev_nli(run.um, run.nli_dev))
    append_jsonl(run.path("metrics.jsonl"), m)
    if run.routing_texts:
        append_jsonl(run.path("routing.jsonl"), {"step": run.step, **routing_snapshot(run.um, *run.routing_texts)})
    return m


def save(run: RunState) -> None:
    """A checkpoint at run.step (rank 0), the other ranks waiting for it."""
    if run.rank == 0:
        save_checkpoint(run.um, run.opt, run.cfg, run.step, run.bad_steps,
                        mtl_state=run.mtl.state_dict() if run.mtl is not None else None)
    if run.world > 1:
        dist.barrier()


class NonFiniteError(RuntimeError):
    """max_bad_steps bad steps in a row: the run stops (the last good checkpoint is named)."""


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python train.py ...` through the CLIs' one error path (model.run_cli): an input error (a bad config or
    data file, a locked or occupied run directory, a full or read-only disk) is one line naming the file, key or
    value, exit code 2; a diverged run (NonFiniteError) one line and exit code 1; `--debug` shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_cli("train.py", main, argv)
    except NonFiniteError as e:
        if "--debug" in argv:
            raise
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
