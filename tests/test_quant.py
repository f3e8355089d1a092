"""Weight-only quantisation of the frozen base (quant.py): the schemes against their formulas written out here,
packing, the on-the-fly forward, LoRA on top, save/load, config errors. Tiny tensors and models only."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import config
import moe_lora
import quant
import train
import unimoer
from model import CausalLM, CheckpointError, ConfigError, ModelConfig
from moe_lora import ExpertSpec, MoELoRAConfig

TINY = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


def tiny_model(seed: int = 0, std: float = 0.2, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf_dict({**TINY, **overrides}))
    for _, p in model.named_parameters():
        if p.dim() == 2:  # RMSNorm weights stay 1
            nn.init.normal_(p, std=std)
    return model.requires_grad_(False).eval()


def experts_config() -> MoELoRAConfig:
    return MoELoRAConfig(experts=[ExpertSpec("embed", 4, 8.0), ExpertSpec("rerank", 4, 8.0),
                                  ExpertSpec("shared", 4, 8.0)])


def write_hf_dir(path: str, model: CausalLM, hf: dict) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{}")  # only copied along by save_quantized
    return path


def weight_with_edge_rows(out: int = 6, n: int = 32, seed: int = 0) -> torch.Tensor:
    """Random rows plus the edge cases: a zero row, an all-positive row, an all-negative row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    w[1] = 0.0
    w[2] = w[2].abs() + 0.5
    w[3] = -w[3].abs() - 0.5
    return w


# --------------------------------------------------------------------------------------------- INT8
def test_int8_round_trip_error_is_at_most_half_the_row_scale():
    w = weight_with_edge_rows()
    q, scale = quant.quantize_int8(w)
    err = (w - quant.dequantize_int8(q, scale)).abs()  # (out, in)
    # round-to-nearest on the grid s_i * k: at most s_i / 2 per element (+ fp32 rounding of w / s)
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6) + 1e-12).all())
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127


def test_int8_codes_equal_the_absmax_formula_by_hand():
    """Row [1, -0.5, 0.25, 0.01]: s = 1/127; q = round(127 w) = [127, round(-63.5) = -64 (half to even), 32, 1].
    A zero row gets s = 1 and codes 0."""
    w = torch.tensor([[1.0, -0.5, 0.25, 0.01], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quant.quantize_int8(w)
    assert q.tolist() == [[127, -64, 32, 1], [0, 0, 0, 0]]
    assert torch.allclose(scale, torch.tensor([1 / 127, 1.0]))


# --------------------------------------------------------------------------------------------- INT4
def gptq_find_params(x: torch.Tensor, maxq: int = 15) -> tuple:
    """IST-DASLab/gptq quant.py Quantizer.find_params, sym=False, per row of x (rows, n), written out."""
    xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0]))
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp], xmax[tmp] = -1, +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


def test_int4_scales_zeros_and_codes_follow_gptq_per_group():
    group = 8
    w = weight_with_edge_rows(n=32)
    packed, scale, zero = quant.quantize_int4(w, group)
    codes = quant.unpack_int4(packed, 32)
    for i in range(w.shape[0]):
        for g in range(32 // group):
            x = w[i, g * group:(g + 1) * group][None]  # one group as GPTQ's (1, n) input
            s, z = gptq_find_params(x)
            q = torch.clamp(torch.round(x / s[:, None]) + z[:, None], 0, 15)  # GPTQ's quantize, before * scale
            assert torch.equal(scale[i, g:g + 1], s) and int(zero[i, g]) == int(z)
            assert codes[i, g * group:(g + 1) * group].tolist() == q[0].to(torch.uint8).tolist()


def test_int4_round_trip_error_is_at_most_half_the_group_scale():
    group = 8
    w = weight_with_edge_rows(n=32, seed=1)
    packed, scale, zero = quant.quantize_int4(w, group)
    deq = quant.dequantize_int4(packed, scale, zero, 32)
    err = (w - deq).abs()
    bound = scale.repeat_interleave(group, dim=1) / 2  # (out, in): its own group's s / 2
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())
    assert torch.equal(deq[1], torch.zeros(32))  # the zero row comes back exactly


def test_int4_group_must_divide_in_features():
    with pytest.raises(ValueError, match="group size 12 must divide in_features 32"):
        quant.quantize_int4(torch.randn(4, 32), 12)


def test_pack_int4_puts_the_first_code_in_the_high_nibble():
    """[0x1, 0xA, 0xF] -> bytes 0x1A, 0xF0 (an odd count padded with a 0 nibble)."""
    assert quant.pack_int4(torch.tensor([1, 10, 15])).tolist() == [0x1A, 0xF0]


@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_unpack_inverts_pack_exactly_for_every_code_and_odd_counts(n):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (5, n), generator=g, dtype=torch.uint8)
    q[0, : min(n, 16)] = torch.arange(min(n, 16), dtype=torch.uint8)  # every code value appears
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (n + 1) // 2)
    assert torch.equal(quant.unpack_int4(packed, n), q)


def test_signed_int4_values_round_trip_through_an_offset_of_8():
    """The stored codes are unsigned; a signed value v in [-8, 7] is stored as v + 8 and comes back exactly."""
    v = torch.arange(-8, 8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(v + 8), 16).long() - 8, v)


# --------------------------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("scheme,group", [("int8", 128), ("int4", 8)])
def test_quant_linear_equals_a_plain_linear_on_the_dequantised_weight(scheme, group):
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=True)
    ql = quant.QuantLinear.from_linear(lin, scheme, group)
    plain = nn.Linear(32, 24, bias=True)
    with torch.no_grad():
        plain.weight.copy_(ql.dequantize()), plain.bias.copy_(lin.bias)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(ql(x), plain(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,group", [("int8", 128), ("int4", 8)])
def test_quantised_model_equals_the_plain_model_with_dequantised_weights(scheme, group, dtype):
    """model.dtype bfloat16: the weight is dequantised to bf16, the activation dtype, and the plain bf16 model on
    those weights runs the very same operations (equal bit for bit); fp32 within 1e-5."""
    model = tiny_model().to(dtype)
    qmodel = quant.quantize_model(copy.deepcopy(model), scheme, group)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for (_, parent, t), (_, qparent, _) in zip(quant._target_linears(plain), quant._target_linears(qmodel)):
            getattr(parent, t).weight.copy_(getattr(qparent, t).dequantize(dtype))
    ids, mask = torch.randint(0, 64, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    h, ref = qmodel(ids, mask).hidden, plain(ids, mask).hidden
    assert h.dtype == dtype and torch.allclose(h.float(), ref.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme,group,bound", [("int8", 128, 0.04), ("int4", 8, 0.3)])
def test_quantised_tiny_model_stays_close_to_fp32(scheme, group, bound):
    """Relative error of the final hidden states ||h~ - h|| / ||h||. Round-to-nearest adds uniform noise of RMS
    s / sqrt(12) per weight: s = max|w| / 127 ~ 3.5 std / 127 for int8 (~0.8% of the weight RMS), s = range / 15 ~
    3 std / 15 for int4 with groups of 8 (~6%); two blocks of 7 noisy linears grow that a few times. The bounds are
    a few times those figures (0.04, 0.3; measured 0.008 and 0.09): loose, but a broken scheme (wrong scale,
    swapped nibbles: 1.2) is off by O(1)."""
    model = tiny_model(std=0.05)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    h = model(ids).hidden
    hq = quant.quantize_model(copy.deepcopy(model), scheme, group)(ids).hidden
    assert float((hq - h).norm() / h.norm()) < bound


def test_moe_lora_on_a_quantised_base_is_the_dequantised_base_plus_the_lora_delta():
    """y = W~ x + sum_i g_i B_i A_i x with W~ the dequantised weight (the MoELoRALinear formula, written out)."""
    torch.manual_seed(0)
    ql = quant.QuantLinear.from_linear(nn.Linear(32, 16, bias=False), "int4", 8)
    lin = moe_lora.MoELoRALinear(ql, experts_config().experts)
    with torch.no_grad():
        lin.lora_B.normal_(std=0.1)
    w = torch.tensor([0.3, 0.7, 1.0])  # embed, rerank, shared weights
    lin.gate = lin.gate_from_weights(w)
    x = torch.randn(5, 32)
    expect = x @ ql.dequantize().t()
    for i, name in enumerate(lin.expert_names):
        sl = lin.expert_slice(name)
        expect = expect + w[i] * 2.0 * (x @ lin.lora_A[sl].t()) @ lin.lora_B[:, sl].t()  # s_i = 8 / 4
    assert torch.allclose(lin(x), expect, atol=1e-5, rtol=0)


def test_lora_experts_train_on_a_quantised_base_and_the_codes_stay_fixed():
    model = quant.quantize_model(tiny_model(), "int4", 8)
    moe_lora.attach(model, experts_config())
    codes = {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".qweight", ".scale", ".zero"))}
    for lin in moe_lora._linears(model):
        nn.init.normal_(lin.lora_B, std=0.05)  # B = 0 at init would give A no gradient
    params = moe_lora.adapter_parameters(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    opt = torch.optim.SGD(params, lr=0.1)
    out = model(torch.randint(0, 64, (2, 6)), task_ids=torch.tensor([0, 1])).hidden
    out.pow(2).mean().backward()
    lins = moe_lora._linears(model)
    assert all(float(lin.lora_A.grad.abs().sum()) > 0 and float(lin.lora_B.grad.abs().sum()) > 0 for lin in lins)
    assert all(not b.requires_grad and b.grad is None for k, b in model.named_buffers() if k in codes)
    opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in codes.items())


def test_merge_into_a_quantised_base_is_refused_with_the_reason():
    model = quant.quantize_model(tiny_model(), "int8")
    moe_lora.attach(model, experts_config())
    with pytest.raises(ValueError, match="int8-quantised .*model.quant"):
        moe_lora.merge(model, {"embed": 1.0})
    assert all(lin.merged_gate is None for lin in moe_lora._linears(model))


def test_detach_gives_back_the_quant_linears():
    model = quant.quantize_model(tiny_model(), "int8")
    q = model.model.layers[0].mlp.up_proj
    moe_lora.detach(moe_lora.attach(model, experts_config()))
    assert model.model.layers[0].mlp.up_proj is q


# --------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("scheme,group", [("int8", 128), ("int4", 8)])
def test_save_and_load_quantized_round_trip_is_bit_identical(tmp_path, scheme, group):
    model = tiny_model()
    src = write_hf_dir(str(tmp_path / "src"), model, TINY)
    qmodel = quant.quantize_model(copy.deepcopy(model), scheme, group)
    quant.save_quantized(qmodel, src, str(tmp_path / "q"))
    loaded = quant.load_quantized(str(tmp_path / "q"))
    a, b = qmodel.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 64, (2, 7))
    assert torch.equal(qmodel(ids).hidden, loaded(ids).hidden)
    assert os.path.isfile(tmp_path / "q" / "tokenizer.json")
    entry = json.load(open(tmp_path / "q" / "config.json"))[quant.QUANT_CONFIG_KEY]
    assert (entry["scheme"], entry["group_size"]) == (scheme, group if scheme == "int4" else None)


def test_load_quantized_is_strict_about_keys(tmp_path):
    model = tiny_model()
    src = write_hf_dir(str(tmp_path / "src"), model, TINY)
    quant.save_quantized(quant.quantize_model(copy.deepcopy(model), "int4", 8), src, str(tmp_path / "q"))
    fn = str(tmp_path / "q" / "model.safetensors")
    state = load_file(fn)
    del state["model.layers.1.mlp.down_proj.zero"]
    save_file(state, fn)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: keys do not match.*down_proj\.zero"):
        quant.load_quantized(str(tmp_path / "q"))


def test_quantising_at_load_time_gives_the_same_codes_every_time():
    """A run references its full-precision base by path and re-quantises it at every load: round to nearest with
    no calibration data is deterministic, so the saved experts meet the very codes they were trained on."""
    a = quant.quantize_model(tiny_model(), "int4", 8).state_dict()
    b = quant.quantize_model(tiny_model(), "int4", 8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_quantised_directory_must_match_model_quant(tmp_path):
    model = tiny_model()
    src = write_hf_dir(str(tmp_path / "src"), model, TINY)
    quant.save_quantized(quant.quantize_model(copy.deepcopy(model), "int4", 8), src, str(tmp_path / "q"))
    for over in ({"quant": "int8"}, {"quant": "int4", "quant_group": 16}):
        cfg = config.config_from_dict({"model": {"path": str(tmp_path / "q"), **over}}, "test.yaml")
        with pytest.raises(ConfigError, match="an int4-quantised base; set model.quant: int4, model.quant_group: 8"):
            unimoer.load_base(cfg, torch.device("cpu"))
    cfg = config.config_from_dict({"model": {"path": str(tmp_path / "q"), "quant": "int4", "quant_group": 8}}, "t")
    assert isinstance(unimoer.load_base(cfg, torch.device("cpu")).model.layers[0].mlp.up_proj, quant.QuantLinear)


# --------------------------------------------------------------------------------------------- config errors
def test_an_unknown_scheme_names_model_quant():
    with pytest.raises(ConfigError, match=r"test\.yaml: model\.quant: 'int3' is not one of 'none', 'int8', 'int4'"):
        config.config_from_dict({"model": {"quant": "int3"}}, "test.yaml")


def test_a_group_below_one_names_model_quant_group():
    with pytest.raises(ConfigError, match=r"model\.quant_group must be >= 1"):
        config.config_from_dict({"model": {"quant_group": 0}}, "test.yaml")


def test_a_group_not_dividing_the_tiny_base_names_model_quant_group():
    """The tiny base (hidden 64 in configs/tiny.yaml, 128 by default) is known when the config is read."""
    with pytest.raises(ConfigError, match=r"model\.quant_group must be a divisor .*hidden_size = 64"):
        config.config_from_dict({"model": {"quant": "int4", "quant_group": 128, "tiny": {"hidden_size": 64}}}, "t")
    config.config_from_dict({"model": {"quant": "int8", "quant_group": 128, "tiny": {"hidden_size": 64}}}, "t")


def test_a_group_not_dividing_a_model_directory_names_model_quant_group_and_the_linear(tmp_path):
    model = tiny_model()
    src = write_hf_dir(str(tmp_path / "src"), model, TINY)
    cfg = config.config_from_dict({"model": {"path": src, "quant": "int4", "quant_group": 32}}, "t")
    with pytest.raises(ConfigError, match=r"model\.quant_group: 32 must divide .*model\.layers\.0\.mlp\.down_proj "
                                          r"has in_features 48"):
        unimoer.load_base(cfg, torch.device("cpu"))


def test_dequantising_in_blocks_of_rows_equals_the_formula_in_one_go(monkeypatch):
    """The forward dequantises DEQUANT_CHUNK elements at a time; with blocks of 2 rows (and a last short block) it
    must give s (q - z) exactly as computed for the whole matrix at once."""
    w = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    packed, scale, zero = quant.quantize_int4(w, 8)
    q8, s8 = quant.quantize_int8(w)
    monkeypatch.setattr(quant, "DEQUANT_CHUNK", 64)
    codes = quant.unpack_int4(packed, 32).float()
    whole4 = (codes - zero.float().repeat_interleave(8, 1)) * scale.repeat_interleave(8, 1)
    assert torch.equal(quant.dequantize_int4(packed, scale, zero, 32), whole4)
    assert torch.equal(quant.dequantize_int8(q8, s8), q8.float() * s8[:, None])


def test_train_checks_model_quant_against_the_model_directory_before_writing(tmp_path):
    """A group that does not divide the directory's linears stops train.check_inputs, before out_dir exists."""
    src = write_hf_dir(str(tmp_path / "src"), tiny_model(), TINY)
    cfg = config.config_from_dict({"model": {"path": src, "quant": "int4", "quant_group": 32},
                                   "data": {"dir": str(tmp_path / "nodata"), "synthetic": True}}, "run.yaml")
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.quant_group: 32 must divide .*down_proj"):
        train.check_inputs(cfg, "run.yaml")
