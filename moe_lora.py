"""Mixture of LoRA experts on a frozen base: stacked experts, per-block routing hook, save/load, merge.

    h' = W h + b + sum_i w_i * s_i * B_i A_i drop(h)        s_i = alpha_i / r_i  (rsLoRA: alpha_i / sqrt(r_i))

Expert i has rank r_i; A_i (r_i, in) is Kaiming-uniform (a = sqrt 5) and B_i (out, r_i) zero, so at step 0 the output
is the base output exactly. All experts are stacked, A_all (sum r, in) and B_all (out, sum r), and the mix is two
matmuls whatever the ranks: h' = W h + b + ((drop(h) A_all^T) * g) B_all^T, with the gate g over the rank slots =
w_i * s_i repeated r_i times. w is per sequence (B, E) or per token (B, T, E). Adapters and routers are fp32 over an
fp32 or bf16 base; the output keeps the base dtype.

attach(model, cfg) wraps the chosen projections of the chosen layers (MoELoRALinear subclasses nn.Linear and keeps the
base `weight`/`bias`, so HF parameter names are unchanged; over a quantised base, model.quant, it holds the
quant.QuantLinear as `base_linear` instead, and merge is refused) and sets each block's `adapter_hook` to a MoEHook:
at block entry it runs the router (router.py) on the block input, adds the router's aux losses to the forward's
context once (not again on gradient-checkpoint recompute), captures the weights when asked, and hands the gate to the
block's linears for that block call only (Block.forward clears it when the block is done). A shared expert is either
always on (weight 1, outside the router) or routed, per config. Within `with fixed_routing(model, routing)` every
hook hands its linears one fixed gate instead (what merge would fold in; what generation with a KV cache needs).

Router kinds: task (TaskRouter per layer), learned (LearnedRouter per layer, or one at the first adapted layer for
all; LD-MoLE's lambda predictor shared by all layers unless router.lambda_shared is false) and retriever
(RouterRetriever: one RetrieverRouter at the first adapted layer for all layers; before the blocks run, a prepass
embeds the input with the plain base, experts off, see base_embedding; its pilots come from set_pilot_embeddings).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from quant import QuantLinear
from router import BASE_EMBEDDING, LearnedRouter, RetrieverRouter, RouterConfig, TaskRouter, max_violation, pool

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTN_TARGETS + MLP_TARGETS
METADATA_KEY = "unimoer.moe_lora"  # safetensors string metadata: the MoELoRAConfig as JSON
SHARED_WEIGHTS = "moe_lora.weights"  # ctx.shared key of the once-per-sequence router's weights
ADDED_TASK = "moe_lora.added_task"  # ctx.shared key: whether this call is the added expert's task
# merge on a quantised base: folding B A into integer codes would re-quantise W + delta (lossy), so it is refused
QUANT_MERGE_ERROR = ("merge: the base is {scheme}-quantised (model.quant); merging a LoRA delta into integer weights "
                     "would re-quantise W + BA and lose the delta's precision. Merge into the full-precision base "
                     "(model.quant: none), then quantise the merged model (python quant.py SRC OUT --quant ...)")


# --------------------------------------------------------------------------------------------- config
@dataclass
class ExpertSpec:
    name: str
    r: int = 8
    alpha: float = 16.0


@dataclass
class AddedExpert:
    """An expert added to a trained run (config.py's `extend:`, extend.py), kept outside the stack: its own add_A
    (r, in) / add_B (out, r) on the linears of `targets` (a subset of the stack's), so the stacked experts' tensors
    and the arithmetic of every call that does not use it are unchanged (its term is skipped, not added as zeros).

    routing "freeze": a call of task id `task` takes a fixed gate (this expert at weight 1, an always-on shared expert
    at 1, the stacked routed experts at 0; the routers are not called); any other call leaves it out. "grow": the
    learned router has one more output column (the last), which weighs this expert in every call."""
    name: str
    r: int = 8
    alpha: float = 16.0
    targets: list = field(default_factory=lambda: list(TARGETS))
    task: int = 2
    routing: str = "freeze"


def _default_experts():
    return [ExpertSpec("embed", 8, 16.0), ExpertSpec("rerank", 8, 16.0), ExpertSpec("shared", 16, 32.0)]


@dataclass
class MoELoRAConfig:
    """Which experts go where and how they are routed. Plain types only: built from the YAML config by
    config.adapter_config (train.mode's experts, the resolved router section)."""
    experts: list = field(default_factory=_default_experts)  # ExpertSpec or {"name", "r", "alpha"} dicts
    targets: list = field(default_factory=lambda: list(TARGETS))  # "q_proj" ... or short "q", "gate", ...
    layers: Optional[list] = None  # layer indices; None = every layer
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    dropout: float = 0.0  # on A's input, training only
    shared: Optional[str] = "always"  # "always": shared expert outside the router, weight 1 | "routed" | None
    shared_expert: str = "shared"  # its name among `experts` (when shared is not None)
    router: RouterConfig = field(default_factory=RouterConfig)
    added: Optional[AddedExpert] = None  # an expert added to a trained run (extend.py), outside the stack

    def __post_init__(self):
        if isinstance(self.experts, list):
            self.experts = [_from_dict(ExpertSpec, e, f"moe_lora.experts[{i}]") if isinstance(e, dict) else e
                            for i, e in enumerate(self.experts)]
        if isinstance(self.router, dict):
            self.router = _from_dict(RouterConfig, self.router, "router")
        if isinstance(self.added, dict):
            self.added = _from_dict(AddedExpert, self.added, "moe_lora.added")
        if self.added is not None:
            self.added.targets = [t if t.endswith("_proj") else f"{t}_proj" for t in self.added.targets]
        self.targets = [t if t.endswith("_proj") else f"{t}_proj" for t in self.targets] \
            if isinstance(self.targets, list) else self.targets
        self.validate()

    @classmethod
    def from_dict(cls, d: dict) -> "MoELoRAConfig":
        return _from_dict(cls, d, "moe_lora")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def routed_experts(self) -> list:
        """Names of the experts the router weighs, in config order (all but an always-on shared expert)."""
        return [e.name for e in self.experts if not (self.shared == "always" and e.name == self.shared_expert)]

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"moe_lora.{name}: {why} (got {getattr(self, name)!r})")

        if not isinstance(self.experts, list) or not self.experts:
            bad("experts", "must be a non-empty list of {name, r, alpha}")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            bad("experts", "names must be distinct non-empty strings")
        for e in self.experts:
            if not isinstance(e.r, int) or e.r < 1 or not e.alpha > 0:
                bad("experts", f"expert {e.name!r}: r must be an int >= 1 and alpha > 0")
        if not isinstance(self.targets, list) or not self.targets or any(t not in TARGETS for t in self.targets) \
                or len(set(self.targets)) != len(self.targets):
            bad("targets", f"must be distinct names among {', '.join(TARGETS)} (or q, k, v, o, gate, up, down)")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers
                                        or any(not isinstance(i, int) for i in self.layers)
                                        or len(set(self.layers)) != len(self.layers)):
            bad("layers", "must be None or a non-empty list of distinct layer indices")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)")
        if self.shared not in (None, "always", "routed"):
            bad("shared", "must be 'always', 'routed' or null")
        if self.shared is not None and self.shared_expert not in names:
            bad("shared_expert", f"must name one of the experts {names}")
        self.router.validate()
        rc, routed = self.router, self.routed_experts
        if rc.loss_free_balance and rc.top_k >= len(routed):
            raise ValueError(f"router.top_k: {rc.top_k} selects every one of the {len(routed)} routed experts "
                             f"{routed}, so router.loss_free_balance has no selection to bias; lower top_k (or route "
                             "the shared expert: adapters.shared routed)")
        if rc.kind == "retriever":
            unlisted = [n for n in routed if not any(n in exps for exps in rc.task_experts.values())]
            if unlisted:
                raise ValueError(f"router.task_experts: kind 'retriever' builds each routed expert's pilot embedding "
                                 f"from the inputs of the tasks that list it; {unlisted} listed by no task")
        x = self.added
        if x is not None:
            if x.name in names or not isinstance(x.r, int) or x.r < 1 or not x.alpha > 0:
                raise ValueError(f"moe_lora.added: expert {x.name!r}: a new name, r an int >= 1 and alpha > 0")
            if not x.targets or any(t not in self.targets for t in x.targets):
                raise ValueError(f"moe_lora.added.targets: must be among the stack's targets {self.targets} "
                                 f"(got {x.targets})")
            if x.routing not in ("freeze", "grow") or (x.routing == "grow" and rc.kind != "learned"):
                raise ValueError(f"moe_lora.added.routing: 'freeze', or 'grow' with a learned router (got "
                                 f"{x.routing!r}, router.kind {rc.kind!r})")
        if rc.kind in ("task", "retriever"):
            for task, exps in rc.task_experts.items():
                unknown = [n for n in exps if n not in routed]
                if unknown:
                    raise ValueError(f"router.task_experts: task {task!r} lists {unknown}, not among the routed experts "
                                     f"{routed}" + (" (an always-on shared expert is added by itself)"
                                                    if self.shared == "always" else ""))


def _from_dict(cls, d: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


def expert_scale(e: ExpertSpec, rslora: bool) -> float:
    return e.alpha / (math.sqrt(e.r) if rslora else e.r)


# --------------------------------------------------------------------------------------------- the linear
class MoELoRALinear(nn.Linear):
    """A frozen nn.Linear plus stacked LoRA experts, mixed by a gate over their rank slots:

        y = W x + b + ((drop(x) A^T) * g) B^T = W x + b + sum_i w_i s_i B_i A_i drop(x)
        A = [A_1; ...; A_E] (R, in), B = [B_1, ..., B_E] (out, R), R = sum r_i, g = (w_i s_i repeated r_i times)
    g (`gate`, fp32): (R,), (B, 1, R) per sequence or (B, T, R) per token, set by the block's MoEHook for one block
    call and cleared after it (None between calls).
    weight/bias are the base's own frozen Parameters; lora_A/lora_B are fp32; the output keeps the base dtype.
    A quantised base (quant.QuantLinear, model.quant) is kept whole as `base_linear` (weight and bias are then None):
    W x + b is its forward, dequantising the integer weight on the fly; the experts are the same fp32 tensors.
    """

    def __init__(self, base: Union[nn.Linear, QuantLinear], experts: list, rslora: bool = False, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantLinear):
            self.base_linear = base  # registered as a child: its codes and scales move with .to(device)
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            dev = base.device
        else:
            self.base_linear = None
            self.register_parameter("weight", base.weight)  # the same Parameters: names and storage unchanged
            self.register_parameter("bias", base.bias)
            dev = base.weight.device
        ranks = [e.r for e in experts]
        R = sum(ranks)
        self.expert_names = [e.name for e in experts]
        self.lora_A = nn.Parameter(torch.empty(R, self.in_features, dtype=torch.float32, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, R, dtype=torch.float32, device=dev))
        self.offsets = [sum(ranks[:i]) for i in range(len(ranks) + 1)]
        for i in range(len(experts)):  # per expert, as nn.Linear(in, r_i) would: fan_in = in
            nn.init.kaiming_uniform_(self.lora_A[self.offsets[i]:self.offsets[i + 1]], a=math.sqrt(5))
        slot_expert = torch.repeat_interleave(torch.arange(len(experts)), torch.tensor(ranks))
        slot_scale = torch.tensor([expert_scale(e, rslora) for e in experts]).repeat_interleave(torch.tensor(ranks))
        self.register_buffer("slot_expert", slot_expert.to(dev), persistent=False)
        self.register_buffer("slot_scale", slot_scale.float().to(dev), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate: Optional[torch.Tensor] = None
        self.merged_gate: Optional[torch.Tensor] = None  # (R,) while merged into weight
        self.add_A: Optional[nn.Parameter] = None  # an added expert (add_expert), outside the stack
        self.add_B: Optional[nn.Parameter] = None
        self.add_gate: Optional[torch.Tensor] = None  # its w * s, broadcast over (B, T, r); None = left out

    def add_expert(self, spec: "AddedExpert") -> None:
        """Give this linear the added expert's own A (r, in; Kaiming-uniform as the stack's) and B (out, r; zero)."""
        dev = self.lora_A.device
        self.add_A = nn.Parameter(torch.empty(spec.r, self.in_features, dtype=torch.float32, device=dev))
        nn.init.kaiming_uniform_(self.add_A, a=math.sqrt(5))
        self.add_B = nn.Parameter(torch.zeros(self.out_features, spec.r, dtype=torch.float32, device=dev))

    def expert_slice(self, name: str) -> slice:
        i = self.expert_names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def gate_from_weights(self, w: torch.Tensor) -> torch.Tensor:
        """Expert weights (..., E) -> rank-slot gate (..., R) = w_i * s_i repeated r_i times."""
        return w.float()[..., self.slot_expert] * self.slot_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # 2-D throughout: the in-place add below then needs no view tracking
        y = F.linear(x2, self.weight, self.bias) if self.base_linear is None else self.base_linear(x2)  # (N, out)
        if self.merged_gate is not None:  # the fixed mix is inside weight
            return y.view(*lead, self.out_features)
        if self.gate is None:
            raise RuntimeError("MoELoRALinear: no routing gate set; call it through the model (the block's MoEHook "
                               "sets it) or assign .gate")
        h = x2 if x2.dtype == torch.float32 else x2.float()
        R = self.lora_A.shape[0]
        u = (F.linear(self.dropout(h), self.lora_A).view(*lead, R) * self.gate).reshape(-1, R)  # (N, R), gated
        if y.dtype == torch.float32:
            y.addmm_(u, self.lora_B.t())  # base + delta in place: no second (N, out) tensor
        else:
            y += F.linear(u, self.lora_B).to(y.dtype)
        if self.add_gate is not None:  # the added expert, only in the calls that use it (AddedExpert)
            r = self.add_A.shape[0]
            u = (F.linear(self.dropout(h), self.add_A).view(*lead, r) * self.add_gate).reshape(-1, r)
            if y.dtype == torch.float32:
                y.addmm_(u, self.add_B.t())
            else:
                y += F.linear(u, self.add_B).to(y.dtype)
        return y.view(*lead, self.out_features)

    @torch.no_grad()
    def delta_weight(self, gate: torch.Tensor) -> torch.Tensor:
        """(out, in) fp32 = sum_i g-weighted B_i A_i for a fixed slot gate (R,)."""
        return (self.lora_B * gate) @ self.lora_A

    @torch.no_grad()
    def merge(self, w: torch.Tensor) -> None:
        """Fold fixed expert weights w (E,) into `weight`, computed in fp32 (then cast to the base dtype)."""
        if self.merged_gate is not None:
            raise RuntimeError("MoELoRALinear: already merged; unmerge first")
        if self.base_linear is not None:
            raise ValueError(QUANT_MERGE_ERROR.format(scheme=self.base_linear.scheme))
        gate = self.gate_from_weights(w.to(self.slot_scale.device))
        self.weight.copy_(self.weight.float() + self.delta_weight(gate))
        self.merged_gate = gate

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged delta, in fp32 (exact up to fp32 rounding; a bf16 base also re-rounds to bf16)."""
        if self.merged_gate is None:
            raise RuntimeError("MoELoRALinear: not merged")
        self.weight.copy_(self.weight.float() - self.delta_weight(self.merged_gate))
        self.merged_gate = None

    def extra_repr(self) -> str:
        ranks = [self.offsets[i + 1] - self.offsets[i] for i in range(len(self.expert_names))]
        bias = f", bias={self.bias is not None}" if self.base_linear is None else ""
        added = f", added={self.add_A.shape[0]}" if self.add_A is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}{bias}, "
                f"experts={dict(zip(self.expert_names, ranks))}{added}")


# --------------------------------------------------------------------------------------------- the block hook
class MoEHook(nn.Module):
    """Block-entry hook: routing weights from the block input -> gate on this block's MoE linears.

    router: LearnedRouter/TaskRouter over the routed experts, or None (no routed experts; or this layer reads the
    once-per-sequence weights that the first adapted layer publishes in ctx.shared).
    The gate is one small matmul: g = w M^T + c, where M (R, E_routed) holds s_i at (slot of expert i, i) and c (R,)
    holds s_i on the slots of always-on experts (their weight is 1), 0 elsewhere. Every product but one per slot is
    with an exact 0, so g equals w_i * s_i exactly.
    """

    def __init__(self, layer_idx: int, linears: list, router: Optional[nn.Module], publish: bool,
                 slot_map: torch.Tensor, slot_const: torch.Tensor, expert_map: torch.Tensor,
                 expert_const: torch.Tensor, added: Optional[AddedExpert] = None, added_scale: float = 0.0):
        super().__init__()
        self.added, self.added_scale = added, added_scale  # an added expert (AddedExpert) and its s
        self.added_linears = tuple(lin for lin in linears if lin.add_A is not None)
        self.layer_idx = layer_idx
        self.linears = tuple(linears)  # a plain tuple: the linears stay registered under their own blocks only
        self.router = router
        self.n_routed = slot_map.shape[1]
        self.publish = publish
        self.register_buffer("slot_map", slot_map, persistent=False)  # (R, E_routed)
        self.register_buffer("slot_const", slot_const, persistent=False)  # (R,)
        self.register_buffer("expert_map", expert_map, persistent=False)  # (E, E_routed): for capture
        self.register_buffer("expert_const", expert_const, persistent=False)  # (E,)
        self.fixed: Optional[torch.Tensor] = None  # (E,) expert weights set by fixed_routing: no router call

    @property
    def routing_is_fixed(self) -> bool:
        """The gate ignores the input: fixed_routing is on, the weights are merged, or every expert is always on."""
        return self.fixed is not None or self.linears[0].merged_gate is not None or not self.n_routed

    def _added_task(self, ctx) -> bool:
        """This call is the added expert's task (under routing freeze: its fixed gate). Decided once per forward
        (ctx.shared); a call mixing it with other tasks is refused (every call holds one task)."""
        if ADDED_TASK not in ctx.shared:
            hit = ctx.task_ids == self.added.task if ctx.task_ids is not None else None
            ctx.shared[ADDED_TASK] = hit is not None and bool(hit.all())
            if hit is not None and not ctx.shared[ADDED_TASK] and bool(hit.any()):
                raise ValueError(f"layer {self.layer_idx}: one call mixes the added expert's task (id "
                                 f"{self.added.task}) with other tasks")
        return ctx.shared[ADDED_TASK]

    def _set_added(self, gate: Optional[torch.Tensor]) -> None:
        for lin in self.added_linears:
            lin.add_gate = gate

    def _capture(self, ctx, full: torch.Tensor, added_w: Optional[torch.Tensor]) -> None:
        """Record the expert weights (B, E) or (B, T, E), config order, the added expert's column last."""
        if ctx.capture and not ctx.done:
            if self.added is not None:
                added_w = full.new_zeros(full.shape[:-1] + (1,)) if added_w is None else added_w.detach()
                full = torch.cat([full, added_w.expand(full.shape[:-1] + (1,)).to(full)], dim=-1)
            ctx.routing.append((self.layer_idx, full))

    def forward(self, x: torch.Tensor, ctx) -> None:
        self._set_added(None)  # left out unless this call uses it (below)
        if not ctx.adapters:  # the plain base: a zero gate (the LoRA term adds exact zeros)
            if self.linears[0].merged_gate is not None:
                raise RuntimeError("adapters=False on a merged model: unmerge first")
            for lin in self.linears:
                lin.gate = self.slot_const.new_zeros(1, 1, self.slot_const.shape[0])
            return
        if self.linears[0].merged_gate is not None:  # fixed weights merged into the base: nothing to route
            return
        if self.fixed is not None:  # fixed_routing: the same gate for every token, as merge would fold in
            gate = self.linears[0].gate_from_weights(self.fixed).view(1, 1, -1)
            for lin in self.linears:
                lin.gate = gate
            self._capture(ctx, self.fixed.expand(x.shape[0], -1).clone(), None)
            return
        if self.added is not None and self.added.routing == "freeze" and self._added_task(ctx):
            for lin in self.linears:  # the added task's fixed gate: the stack's routed experts 0, always-on 1
                lin.gate = self.slot_const.view(1, 1, -1)
            self._set_added(self.slot_const.new_full((1, 1, 1), self.added_scale))
            self._capture(ctx, self.expert_const.expand(x.shape[0], -1).clone(), self.slot_const.new_ones(1))
            return
        if self.router is not None:
            w, aux = self.router(x, ctx)
            for name, value in aux.items():
                ctx.add_aux(name, value)  # a no-op on checkpoint recompute (ctx.done)
            if self.publish and not ctx.done:
                ctx.shared[SHARED_WEIGHTS] = w
        elif self.n_routed:
            w = ctx.shared.get(SHARED_WEIGHTS)
            if w is None:
                raise RuntimeError(f"layer {self.layer_idx}: once-per-sequence routing weights missing from ctx.shared")
        else:
            w = None  # only always-on experts: a constant gate
        w_added = None
        if w is not None and self.added is not None and self.added.routing == "grow":
            w, w_added = w[..., :self.n_routed], w[..., self.n_routed:]  # the grown router's last column
            self._set_added((w_added * self.added_scale)[:, None, :] if w_added.dim() == 2 else
                            w_added * self.added_scale)
        if w is None:
            gate = self.slot_const.view(1, 1, -1)
        else:
            gate = F.linear(w, self.slot_map, self.slot_const)  # (B, R) or (B, T, R)
            if gate.dim() == 2:
                gate = gate[:, None, :]  # per sequence: broadcast over tokens
        for lin in self.linears:
            lin.gate = gate
        if ctx.capture and not ctx.done:
            full = self.expert_const.expand(x.shape[0], -1).clone() if w is None else \
                F.linear(w.detach(), self.expert_map, self.expert_const)  # (B, E) or (B, T, E), config order
            self._capture(ctx, full, w_added)

    def clear(self) -> None:
        """Take the gates back from the linears (Block.forward calls it when the block is done): they reference
        this call's router graph and hold for this call only."""
        for lin in self.linears:
            lin.gate = None
            lin.add_gate = None


# --------------------------------------------------------------------------------------------- attach / detach
def _linears(model) -> list:
    return [m for m in model.modules() if isinstance(m, MoELoRALinear)]


def get_config(model) -> MoELoRAConfig:
    cfg = getattr(model, "moe_lora_config", None)
    if cfg is None:
        raise ValueError("the model carries no MoE-LoRA experts (call moe_lora.attach first)")
    return cfg


def attach(model, cfg: MoELoRAConfig):
    """Wrap cfg.targets in cfg.layers of `model` (a model.CausalLM) with experts and routers, in place.

    The base is frozen (requires_grad False); only the experts' lora_A/lora_B and the routers' tensors train.
    """
    if getattr(model, "moe_lora_config", None) is not None:
        raise ValueError("the model already carries MoE-LoRA experts (detach first)")
    cfg.validate()
    n_layers = model.config.num_hidden_layers
    layers = sorted(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    if any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"moe_lora.layers: indices must be in [0, {n_layers}) (got {cfg.layers!r})")
    model.requires_grad_(False)

    rc, experts, routed = cfg.router, cfg.experts, cfg.routed_experts
    # Routing weights w (..., E_routed) -> full expert weights w M_e^T + c_e (E,) -> slot gate (R,) (see MoEHook).
    expert_map = torch.zeros(len(experts), len(routed))
    expert_const = torch.zeros(len(experts))
    for i, e in enumerate(experts):
        if e.name in routed:
            expert_map[i, routed.index(e.name)] = 1.0
        else:
            expert_const[i] = 1.0
    ranks = torch.tensor([e.r for e in experts])
    scale = torch.tensor([expert_scale(e, cfg.rslora) for e in experts], dtype=torch.float32)
    slot_map = (expert_map * scale[:, None]).repeat_interleave(ranks, dim=0)  # (R, E_routed)
    slot_const = (expert_const * scale).repeat_interleave(ranks)  # (R,)
    table = torch.zeros(len(rc.tasks), len(routed))
    if rc.kind == "task":
        for t, task in enumerate(rc.tasks):
            for name in rc.task_experts[task]:
                table[t, routed.index(name)] = 1.0

    first_router = None
    for n, li in enumerate(layers):
        block = model.model.layers[li]
        linears = []
        for t in cfg.targets:
            parent = block.self_attn if t in ATTN_TARGETS else block.mlp
            lin = MoELoRALinear(getattr(parent, t), experts, cfg.rslora, cfg.dropout)
            if cfg.added is not None and t in cfg.added.targets:
                lin.add_expert(cfg.added)
            setattr(parent, t, lin)
            linears.append(lin)
        dev = linears[0].lora_A.device  # the base's device (lora_A is made there)
        router = None
        if routed and rc.kind == "task":
            router = TaskRouter(table)
        elif routed and rc.kind == "retriever" and n == 0:
            router = RetrieverRouter(model.config.hidden_size, len(routed), rc)
        elif routed and rc.kind == "learned" and (rc.per_layer or n == 0):
            shared_lambda = first_router.lam if first_router is not None and rc.lambda_shared else None
            grown = cfg.added is not None and cfg.added.routing == "grow"  # one more column: the added expert
            router = LearnedRouter(model.config.hidden_size, len(routed) + grown, rc, shared_lambda=shared_lambda)
            first_router = first_router or router
        if router is not None:
            router.to(dev)
        publish = bool(routed) and n == 0 and (rc.kind == "retriever" or (rc.kind == "learned" and not rc.per_layer))
        block.adapter_hook = MoEHook(li, linears, router, publish, slot_map.to(dev), slot_const.to(dev),
                                     expert_map.to(dev), expert_const.to(dev), cfg.added,
                                     expert_scale(cfg.added, cfg.rslora) if cfg.added is not None else 0.0)
    model.adapter_prepass = retriever_prepass if routed and rc.kind == "retriever" else None
    model.moe_lora_config = cfg
    return model


def detach(model):
    """Remove the experts (unmerging first if merged): the plain backbone with its original nn.Linear modules."""
    get_config(model)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, MoELoRALinear):
                    if child.merged_gate is not None:
                        child.unmerge()
                    if child.base_linear is not None:  # a quantised base: its QuantLinear again
                        setattr(parent, name, child.base_linear)
                        continue
                    lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                    lin.weight, lin.bias = child.weight, child.bias
                    setattr(parent, name, lin)
        block.adapter_hook = None
    model.adapter_prepass = None
    model.moe_lora_config = None
    return model


def adapter_state_dict(model) -> dict:
    """{name: tensor} of everything trainable that attach added: experts' lora_A/lora_B and routers' tensors."""
    get_config(model)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MoELoRALinear):
            sd[f"{name}.lora_A"], sd[f"{name}.lora_B"] = mod.lora_A, mod.lora_B
            if mod.add_A is not None:
                sd[f"{name}.add_A"], sd[f"{name}.add_B"] = mod.add_A, mod.add_B
        elif isinstance(mod, MoEHook):
            sd.update({f"{name}.{k}": v for k, v in mod.state_dict(keep_vars=True).items()})
    return sd


def adapter_parameters(model) -> list:
    """The trainable parameters (for the optimizer)."""
    return [p for p in adapter_state_dict(model).values() if isinstance(p, nn.Parameter)]


# --------------------------------------------------------------------------------------------- loss-free balancing
def balance_routers(model) -> list:
    """The LearnedRouters with router.loss_free_balance on, in module order (the same on every rank)."""
    return [m for m in model.modules() if isinstance(m, LearnedRouter) and m.cfg.loss_free_balance]


@torch.no_grad()
def update_balance_bias(model, world: int = 1, apply: bool = True) -> dict:
    """Loss-Free Balancing after an optimizer step (Wang et al. 2024, Alg. 1): every biased router's
    selection counts of the step (its training forwards with grad: each unit once, also under GradCache) are summed
    over the DDP ranks (the global batch), its bias moved by router.loss_free_bias_update, and the counts reset.

    apply=False (a skipped or undone step, the same on every rank): the counts are dropped, the bias kept (the step
    did not happen). -> {"lfb_maxvio": mean over the routers of the step's MaxVio, "lfb_bias": max_i |b_i| over the
    routers after the update} for the log; {} without biased routers or when not applied."""
    routers = balance_routers(model)
    if not routers:
        return {}
    counts = torch.stack([r.balance_counts if r.balance_counts is not None else torch.zeros_like(r.balance_bias)
                          for r in routers])  # (L, E)
    for r in routers:
        r.balance_counts = None
    if not apply:
        return {}
    if world > 1:
        dist.all_reduce(counts)
    for r, c in zip(routers, counts):
        r.update_balance_bias(c)
    return {"lfb_maxvio": float(max_violation(counts).mean()),
            "lfb_bias": max(float(r.balance_bias.abs().max()) for r in routers)}


# --------------------------------------------------------------------------------------------- RouterRetriever
@torch.no_grad()
def base_embedding(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(B, H) fp32 embedding of the input by the frozen base alone (experts off): its final-norm hidden states
    pooled by router.pooling (mean over non-pad tokens, or the last real token). What RouterRetriever routes on."""
    out = model(input_ids, attention_mask, causal=causal, adapters=False)
    return pool(out.hidden, attention_mask.to(out.hidden.device), get_config(model).router.pooling)


def retriever_prepass(model, input_ids, attention_mask, causal, ctx) -> None:
    """CausalLM.adapter_prepass for router kind "retriever": the base embedding into ctx.shared, once per call."""
    if all(h.routing_is_fixed for h in _hooks(model)):
        return  # merged or fixed_routing: nothing reads the embedding
    ctx.shared[BASE_EMBEDDING] = base_embedding(model, input_ids, attention_mask, causal)


def _retriever(model) -> RetrieverRouter:
    for m in model.modules():
        if isinstance(m, RetrieverRouter):
            return m
    raise ValueError("set_pilot_embeddings: the model has no RetrieverRouter (router.kind must be 'retriever')")


@torch.no_grad()
def set_pilot_embeddings(model, inputs: dict) -> torch.Tensor:
    """RouterRetriever pilots from data: inputs {routed expert name: [(input_ids, attention_mask, causal), ...]}
    -> pilots (E_routed, H), row i = the mean base_embedding over all of expert i's inputs (the centroid of its
    data, the reference's k = 1). Stored in the router's `pilots` buffer, so save_adapters writes them."""
    routed = get_config(model).routed_experts
    missing = [n for n in routed if not inputs.get(n)]
    if missing:
        raise ValueError(f"set_pilot_embeddings: no inputs for the routed expert(s) {missing}")
    was_training = model.training
    model.eval()
    try:
        rows = []
        for name in routed:
            embs = [base_embedding(model, ids, mask, causal) for ids, mask, causal in inputs[name]]
            rows.append(torch.cat(embs).mean(0))
    finally:
        model.train(was_training)
    pilots = torch.stack(rows)
    _retriever(model).set_pilots(pilots)
    return pilots


# --------------------------------------------------------------------------------------------- save / load
def save_adapters(model, path: str) -> None:
    """Write the adapter tensors to a safetensors file, the MoELoRAConfig as JSON in its string metadata."""
    cfg = get_config(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(cfg.to_dict())})


def load_adapters(model, path: str) -> MoELoRAConfig:
    """Rebuild the experts and routers from the file's spec, attach them to `model` and load their tensors.

    The model may be plain (attach is done here) or already carry experts with the very same spec. Keys and shapes
    are checked strictly; errors name the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter file not found")
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if METADATA_KEY not in meta:
            raise ValueError(f"{path}: not a MoE-LoRA adapter file (no {METADATA_KEY!r} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        cfg = MoELoRAConfig.from_dict(json.loads(meta[METADATA_KEY]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid MoE-LoRA spec in metadata: {e}") from None
    current = getattr(model, "moe_lora_config", None)
    if current is None:
        attach(model, cfg)
    elif current.to_dict() != cfg.to_dict():
        raise ValueError(f"{path}: the model already carries experts with a different spec; load into a plain model")
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the spec in its metadata; missing: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; unexpected: {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    with torch.no_grad():
        for k, t in tensors.items():
            if t.shape != expected[k].shape:
                raise ValueError(f"{path}: tensor {k!r} has shape {list(t.shape)}, the model expects "
                                 f"{list(expected[k].shape)}")
            expected[k].copy_(t)
    return cfg


# --------------------------------------------------------------------------------------------- merge
def fixed_weights(cfg: MoELoRAConfig, routing: Union[str, dict]) -> torch.Tensor:
    """(E,) fp32 expert weights for a task name (its task_experts, weight 1) or {expert name: weight}; an
    always-on shared expert gets 1."""
    routed = cfg.routed_experts
    if isinstance(routing, str):
        if routing not in cfg.router.task_experts:
            raise ValueError(f"merge: unknown task {routing!r}; router.task_experts has {list(cfg.router.task_experts)}")
        routing = {name: 1.0 for name in cfg.router.task_experts[routing]}
    unknown = [n for n in routing if n not in routed]
    if unknown:
        raise ValueError(f"merge: {unknown} are not routed experts {routed}")
    return torch.tensor([1.0 if e.name not in routed else float(routing.get(e.name, 0.0)) for e in cfg.experts])


def merge(model, routing: Union[str, dict]) -> None:
    """Fold fixed weights (hard routing at deployment) into the base weights, in fp32; routing is then skipped."""
    w = fixed_weights(get_config(model), routing)
    linears = _linears(model)
    quantised = [lin.base_linear.scheme for lin in linears if lin.base_linear is not None]
    if quantised:  # refuse before any linear is touched
        raise ValueError(QUANT_MERGE_ERROR.format(scheme=quantised[0]))
    for lin in linears:
        lin.merge(w)


def unmerge(model) -> None:
    get_config(model)
    for lin in _linears(model):
        lin.unmerge()


def _hooks(model) -> list:
    return [b.adapter_hook for b in model.model.layers if isinstance(b.adapter_hook, MoEHook)]


@contextmanager
def fixed_routing(model, routing: Union[str, dict]):
    """Within the `with` block every MoE linear uses one fixed gate, the weights fixed_weights(cfg, routing) gives
    (a task name, or {expert name: weight}; an always-on shared expert keeps 1): e.g. {"rerank": 1.0} is that
    expert alone (one-hot) plus the shared one, {} the shared one alone. The routers are not called (no aux
    losses). The output equals merge(model, routing)'s up to fp32 rounding and the base weights stay untouched
    (merge / unmerge re-round a bf16 base); the experts all off is forward(..., adapters=False). A gate that does
    not depend on the input is what a KV cache needs (generate.py). The previous state is restored on exit."""
    w = fixed_weights(get_config(model), routing)
    hooks = _hooks(model)
    if any(h.linears[0].merged_gate is not None for h in hooks):
        raise RuntimeError("fixed_routing on a merged model: unmerge first")
    previous = [h.fixed for h in hooks]
    for h in hooks:
        h.fixed = w.to(h.slot_const.device)
    try:
        yield model
    finally:
        for h, p in zip(hooks, previous):
            h.fixed = p
