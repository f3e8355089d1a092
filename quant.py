"""Weight-only quantisation of the frozen base (model.quant: int8 | int4): integer weights, dequantised on the fly.

INT8, per output channel: LLM.int8()'s vector-wise absmax quantisation of the weight (Dettmers et al. 2022,
"LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", Sec. 3.1 absmax X_i8 = round(127 X / max|X|),
taken per row of W as in bitsandbytes' row-wise int8_vectorwise_quant), weight only: no outlier decomposition (the
activations stay in float). Per output row i:

    s_i = max_j |W_ij| / 127        q_ij = clamp(round(W_ij / s_i), -127, 127)  (int8)        W~_ij = s_i q_ij

so |W_ij - W~_ij| <= s_i / 2. A row of zeros gets s_i = 1 (q = 0, W~ = 0 exactly), as bitsandbytes sets absmax 0 to 1.

INT4, group-wise along the input dimension: GPTQ's asymmetric min/max quantiser (Frantar et al. 2023; official code
IST-DASLab/gptq, quant.py Quantizer.find_params with sym=False and quantize()), rounded to nearest, without GPTQ's
Hessian-based error compensation (RTN, no calibration data). For each output row i and group g of G consecutive
input columns (G = model.quant_group, GPTQ's --groupsize):

    lo = min(min_j W_ij, 0)   hi = max(max_j W_ij, 0)   (lo = hi = 0 -> lo = -1, hi = 1)
    s = (hi - lo) / 15        z = round(-lo / s)  (in [0, 15] since lo <= 0 <= hi)
    q = clamp(round(W / s) + z, 0, 15)        W~ = s (q - z)

Because the range includes 0, the grid s (q - z), q = 0..15, reaches to within s/2 of lo and hi, so
|W_ij - W~_ij| <= s / 2 for every element. Storage: two 4-bit codes per uint8 byte along the input dimension, the
first in the high nibble ((q_2k << 4) | q_2k+1, torchao's uint4 packing); an odd count is padded with a 0 nibble.
Scales are fp32 (out, in / G), zero points uint8 (out, in / G), one byte each (not packed).

Which linears: the decoder blocks' q/k/v/o/gate/up/down projections (QUANT_TARGETS). Embeddings, norms and the LM
head stay in model.dtype (the tied Qwen3 LM head is the embedding matrix). QuantLinear.forward dequantises the
whole weight to the activation dtype (in fp32 blocks of rows, so the scratch is one weight in that dtype) and calls
F.linear (CPU and CUDA alike; no integer kernels). LoRA experts
(moe_lora.MoELoRALinear) stay fp32 on top, computing their base output through the QuantLinear's forward.

A quantised base directory (save_quantized / load_quantized, `python quant.py SRC OUT --quant int4`) is an HF-style
directory: config.json with a `quantization_config` {"quant_method": "unimoer-rtn", "scheme", "group_size",
"modules", ...}, model.safetensors holding <linear>.qweight / .scale (/ .zero) (+ .bias) and the float tensors,
and the source directory's tokenizer files.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from model import ArgumentParser, CausalLM, CheckpointError, ConfigError, ModelConfig, load_pretrained, run_cli

QUANT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEMES = ("int8", "int4")
QUANT_CONFIG_KEY = "quantization_config"  # in config.json
QUANT_METHOD = "unimoer-rtn"
INT8_MAX = 127
INT4_MAX = 15
DEQUANT_CHUNK = 1 << 22  # elements of each fp32 temporary while dequantising (16 MB)


# --------------------------------------------------------------------------------------------- INT8
def quantize_int8(w: torch.Tensor) -> tuple:
    """w (out, in) -> q (out, in) int8, scale (out,) fp32: s_i = max_j |w_ij| / 127, q = clamp(round(w / s), +-127)."""
    w = w.float()
    absmax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) = s_i q_ij, computed in fp32 a block of rows at a time, written into the dtype result."""
    out_f, n = q.shape
    w = torch.empty(out_f, n, dtype=dtype, device=q.device)
    for r in range(0, out_f, _chunk_rows(n)):
        sl = slice(r, r + _chunk_rows(n))
        w[sl] = q[sl].float().mul_(scale[sl, None])
    return w


def _chunk_rows(in_features: int) -> int:
    """Rows per dequantisation block: its fp32 temporaries hold at most DEQUANT_CHUNK elements, so the scratch
    memory of a forward is one dequantised weight in the activation dtype (+ 16 MB)."""
    return max(1, DEQUANT_CHUNK // in_features)


# --------------------------------------------------------------------------------------------- INT4
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (..., n), any integer dtype -> uint8 (..., ceil(n / 2)): byte k = (q_2k << 4) | q_2k+1.
    An odd n is padded with one 0 code."""
    q = q.to(torch.uint8)
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., ceil(n / 2)) -> codes uint8 (..., n): the high nibble first, then the low one."""
    hi, lo = packed >> 4, packed & 0x0F
    return torch.stack((hi, lo), dim=-1).flatten(-2)[..., :n]


def int4_params(w: torch.Tensor, group: int) -> tuple:
    """GPTQ's find_params (sym=False) per (row, group): w (out, in) -> scale, zero (out, in / group) fp32."""
    out, n = w.shape
    g = w.float().view(out, n // group, group)
    lo = g.amin(dim=2).clamp(max=0)  # (out, G) min(min w, 0)
    hi = g.amax(dim=2).clamp(min=0)  # max(max w, 0)
    both_zero = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)
    scale = (hi - lo) / INT4_MAX
    zero = torch.round(-lo / scale)
    return scale, zero


def quantize_int4(w: torch.Tensor, group: int) -> tuple:
    """w (out, in) -> packed uint8 (out, ceil(in / 2)), scale fp32 (out, in / group), zero uint8 (out, in / group).
    q = clamp(round(w / s) + z, 0, 15) per group of `group` input columns."""
    out, n = w.shape
    if group < 1 or n % group:
        raise ValueError(f"int4 group size {group} must divide in_features {n}")
    scale, zero = int4_params(w, group)
    s, z = scale.repeat_interleave(group, dim=1), zero.repeat_interleave(group, dim=1)  # (out, in)
    q = (torch.round(w.float() / s) + z).clamp_(0, INT4_MAX)
    return pack_int4(q), scale, zero.to(torch.uint8)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) = s (q - z) per group, computed in fp32 a block of rows at a time, written into the dtype result."""
    out_f, n_groups = scale.shape
    group = in_features // n_groups
    w = torch.empty(out_f, in_features, dtype=dtype, device=packed.device)
    for r in range(0, out_f, _chunk_rows(in_features)):
        sl = slice(r, r + _chunk_rows(in_features))
        q = unpack_int4(packed[sl], in_features).float().view(-1, n_groups, group)  # (rows, G, group)
        w[sl] = q.sub_(zero[sl, :, None]).mul_(scale[sl, :, None]).view(-1, in_features)
    return w


# --------------------------------------------------------------------------------------------- the module
class QuantLinear(nn.Module):
    """A frozen linear y = W~ x + b with W~ dequantised from integer codes at every call (buffers, never trained).

    int8: qweight int8 (out, in), scale fp32 (out,). int4: qweight uint8 (out, ceil(in / 2)) (two codes a byte),
    scale fp32 (out, in / G), zero uint8 (out, in / G). bias (out,) in the base dtype or None.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 128, bias: bool = False,
                 device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"QuantLinear: scheme must be one of {SCHEMES} (got {scheme!r})")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group_size = group_size if scheme == "int4" else in_features
        if scheme == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
            self.zero = None
        else:
            if in_features % group_size:
                raise ValueError(f"int4 group size {group_size} must divide in_features {in_features}")
            n_groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float32, device=device))
            self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, scheme: str, group_size: int = 128) -> "QuantLinear":
        """Quantise an nn.Linear's weight (read in fp32); the bias is kept as it is."""
        q = cls(lin.in_features, lin.out_features, scheme, group_size, lin.bias is not None, device="meta")
        if scheme == "int8":
            q.qweight, q.scale = quantize_int8(lin.weight)
        else:
            q.qweight, q.scale, q.zero = quantize_int4(lin.weight, group_size)
        if lin.bias is not None:
            q.bias = lin.bias.detach().clone()
        return q

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W~ (out, in) in dtype."""
        if self.scheme == "int8":
            return dequantize_int8(self.qweight, self.scale, dtype)
        return dequantize_int4(self.qweight, self.scale, self.zero, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}, "
                f"bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------- a whole model
def _target_linears(model: CausalLM) -> list:
    """(qualified name, parent module, attribute) of each decoder-block projection QUANT_TARGETS names."""
    out = []
    for i, block in enumerate(model.model.layers):
        for part, parent in (("self_attn", block.self_attn), ("mlp", block.mlp)):
            for t in QUANT_TARGETS:
                if hasattr(parent, t):
                    out.append((f"model.layers.{i}.{part}.{t}", parent, t))
    return out


def check_group(model: CausalLM, scheme: str, group_size: int, where: str = "model.quant_group") -> None:
    """int4: group_size must divide the in_features of every quantised linear; one ConfigError naming the key."""
    if scheme != "int4":
        return
    for name, parent, t in _target_linears(model):
        n = getattr(parent, t).in_features
        if group_size < 1 or n % group_size:
            raise ConfigError(f"{where}: {group_size} must divide the input size of every quantised linear; "
                              f"{name} has in_features {n}")


@torch.no_grad()
def quantize_model(model: CausalLM, scheme: str, group_size: int = 128, where: str = "model.quant_group") -> CausalLM:
    """Replace the decoder's projections (QUANT_TARGETS) by QuantLinear, in place, one linear at a time (each
    weight read in fp32, its float copy then freed). Call before moe_lora.attach."""
    if scheme not in SCHEMES:
        raise ConfigError(f"model.quant: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if getattr(model, "moe_lora_config", None) is not None:
        raise ValueError("quantize_model: the model already carries MoE-LoRA experts; quantise the plain base first")
    check_group(model, scheme, group_size, where)
    for _, parent, t in _target_linears(model):
        lin = getattr(parent, t)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"quantize_model: {type(lin).__name__} at {t} is not a plain nn.Linear")
        setattr(parent, t, QuantLinear.from_linear(lin, scheme, group_size))
    model.quant_config = {"scheme": scheme, "group_size": group_size}
    return model


def code_tensors(model: nn.Module) -> list:
    """The buffers every QuantLinear in model holds (codes, scales, zero points, bias): what a quantised base
    stores in place of its weight parameters (evaluate.param_costs, rag.held_param_bytes count them)."""
    return [b for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers()]


def quant_scheme(model) -> Optional[dict]:
    """{"scheme", "group_size"} of a quantised base, None for a float one."""
    return getattr(model, "quant_config", None)


# --------------------------------------------------------------------------------------------- save / load
def _quant_entry(scheme: str, group_size: int) -> dict:
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "group_size": group_size if scheme == "int4" else None,
            "modules": list(QUANT_TARGETS), "scale_dtype": "float32",
            "int4_packing": "two codes per uint8 along in_features, first in the high nibble; zero points uint8"}


def save_quantized(model: CausalLM, src_dir: str, out_dir: str) -> None:
    """Write a quantised base as a directory: src_dir's config.json plus `quantization_config`, model.safetensors
    (the state dict: integer codes, scales, zero points and the float tensors), src_dir's tokenizer files."""
    q = quant_scheme(model)
    if q is None:
        raise ValueError("save_quantized: the model is not quantised (call quantize_model first)")
    if getattr(model, "moe_lora_config", None) is not None:
        raise ValueError("save_quantized: the model carries MoE-LoRA experts; save the plain base (experts are "
                         "saved by moe_lora.save_adapters)")
    with open(os.path.join(src_dir, "config.json")) as f:
        hf = json.load(f)
    hf[QUANT_CONFIG_KEY] = _quant_entry(q["scheme"], q["group_size"])
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(src_dir):  # tokenizer.json, tokenizer_config.json, generation_config.json, ...
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(src, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def stored_quantization(path: str) -> Optional[dict]:
    """A model directory's `quantization_config` ({"scheme", "group_size", ...}), None if it has none."""
    fn = os.path.join(path, "config.json")
    if not os.path.isfile(fn):
        return None
    with open(fn) as f:
        entry = json.load(f).get(QUANT_CONFIG_KEY)
    if entry is None:
        return None
    if entry.get("quant_method") != QUANT_METHOD or entry.get("scheme") not in SCHEMES:
        raise CheckpointError(f"{fn}: {QUANT_CONFIG_KEY} is not one this code writes (quant_method "
                              f"{QUANT_METHOD!r}, scheme one of {SCHEMES}); got {entry}")
    return entry


def check_setting(path: str, scheme: str, group_size: int, where: str = "config") -> Optional[dict]:
    """model.quant / model.quant_group against the model directory `path`, before anything is loaded: a quantised
    directory must be named by its own scheme (and group); for int4 on a float one, the group must divide every
    quantised linear's input size. One ConfigError naming the keys. Returns the stored quantization_config or None."""
    stored = stored_quantization(path)
    if stored is not None:
        group = stored["group_size"] if stored["scheme"] == "int4" else group_size
        if (scheme, group_size) != (stored["scheme"], group):
            detail = f", model.quant_group: {group}" if stored["scheme"] == "int4" else ""
            raise ConfigError(f"{where}: model.path {path} holds an {stored['scheme']}-quantised base; set "
                              f"model.quant: {stored['scheme']}{detail} (got model.quant {scheme!r}, model.quant_group "
                              f"{group_size})")
    elif scheme == "int4":
        with torch.device("meta"):
            model = CausalLM(ModelConfig.from_json(os.path.join(path, "config.json")))
        check_group(model, scheme, group_size, where=f"{where}: model.quant_group")
    return stored


def load_quantized(path: str, dtype: torch.dtype = torch.float32, device="cpu") -> CausalLM:
    """A directory written by save_quantized -> CausalLM with QuantLinear projections, keys, shapes and dtypes checked
    strictly. Integer codes, scales and zero points keep their stored dtypes; the float tensors are cast to dtype."""
    entry = stored_quantization(path)
    if entry is None:
        raise CheckpointError(f"{path}: config.json has no {QUANT_CONFIG_KEY} (not a quantised base directory)")
    fn = os.path.join(path, "model.safetensors")
    if not os.path.isfile(fn):
        raise CheckpointError(f"{fn}: not found")
    cfg = ModelConfig.from_json(os.path.join(path, "config.json"))
    scheme, group = entry["scheme"], entry["group_size"] or 0
    with torch.device("meta"):
        model = CausalLM(cfg)
        check_group(model, scheme, group, where=f"{path}/config.json: {QUANT_CONFIG_KEY}.group_size")
        for _, parent, t in _target_linears(model):
            lin = getattr(parent, t)
            setattr(parent, t, QuantLinear(lin.in_features, lin.out_features, scheme, group, lin.bias is not None))
    expected = model.state_dict()
    state = {}
    with safe_open(fn, framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{fn}: keys do not match the {scheme} model of config.json; missing: "
                                  f"{missing[:10]}; unexpected: {unexpected[:10]}")
        for k in keys:
            t, want = f.get_tensor(k), expected[k]
            if list(t.shape) != list(want.shape):
                raise CheckpointError(f"{fn}: tensor {k!r} has shape {list(t.shape)}, expected {list(want.shape)}")
            integer = not want.dtype.is_floating_point or k.endswith((".scale", ".zero"))
            if integer and t.dtype != want.dtype:
                raise CheckpointError(f"{fn}: tensor {k!r} has dtype {t.dtype}, expected {want.dtype}")
            state[k] = t if integer else t.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.quant_config = {"scheme": scheme, "group_size": group}
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = ArgumentParser(prog="quant.py", description="Quantise an HF model directory's decoder linears "
                       "(weight-only INT8 per channel or INT4 group-wise) into a quantised base directory.")
    p.add_argument("src", help="full-precision HF model directory (config.json + safetensors + tokenizer)")
    p.add_argument("out", help="output directory")
    p.add_argument("--quant", choices=SCHEMES, required=True)
    p.add_argument("--group", type=int, default=128, help="int4 group size along the input dimension")
    a = p.parse_args(argv)
    model = quantize_model(load_pretrained(a.src, dtype=torch.float32), a.quant, a.group, where="--group")
    save_quantized(model, a.src, a.out)
    print(f"wrote {a.out} ({a.quant}{f', group {a.group}' if a.quant == 'int4' else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("quant.py", main))
