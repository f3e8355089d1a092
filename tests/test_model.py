"""model.py as a spec: forward parity with transformers, config reading, checkpoint loading and its errors.

The references are tiny random transformers models (qwen3, qwen2, llama, mistral) written with save_pretrained and
loaded back with load_pretrained, so the same weights run through both implementations.
"""
import copy
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from model import (  # noqa: E402
    CausalLM,
    CheckpointError,
    ConfigError,
    ModelConfig,
    last_token_positions,
    load_pretrained,
)

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 parity tolerance
VOCAB, T = 128, 10
LENGTHS = (10, 4, 7)  # one full-length row, two padded rows
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2)

# model_type -> (config class, model class, what this case exercises beyond the common tiny sizes)
SPECS = {
    # explicit head_dim != hidden/heads (24 vs 16), q/k norm, attention biases, non-default theta, untied head
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(head_dim=24, attention_bias=True, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # qkv bias without o bias, tied head; saved sharded
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # attention and MLP biases (o_proj included), untied head
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    # no sliding window, tied head
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=True)),
}
MODEL_TYPES = list(SPECS)
SHARDED = "qwen2"
TIED = {name for name, spec in SPECS.items() if spec[2]["tie_word_embeddings"]}


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """model_type -> (checkpoint dir, HF reference model in eval mode, fp32)."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    out = {}
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(SPECS.items()):
        torch.manual_seed(i)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**TINY, **extra)).eval()
        # HF init gives unit norms, zero biases and tiny weights: randomise everything so a swapped norm, a dropped
        # bias or a wrong scale shows up as a real difference.
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                p.normal_(1.0, 0.2) if "norm" in pname else p.normal_(0.0, 0.15)
        d = root / name
        hf.save_pretrained(d, max_shard_size="100KB" if name == SHARDED else "1GB")
        out[name] = (str(d), hf)
    # The sharded and single-file readers are different code paths: make sure each is really on disk.
    assert os.path.isfile(root / SHARDED / "model.safetensors.index.json")
    assert os.path.isfile(root / "qwen3" / "model.safetensors")
    return out


@pytest.fixture(scope="session")
def ours(checkpoints):
    return {name: load_pretrained(d) for name, (d, _) in checkpoints.items()}


def padded_batch(side, seed=0):
    """Random ids (3, T) with LENGTHS real tokens padded on `side` (pad id 0), and the (3, T) 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), T), generator=g)
    mask = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, T - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def hf_forward(hf, ids, mask, attention_mask=None):
    """HF outputs with our positions (cumsum of the mask) and every block's raw output (hooks: HF's own
    hidden_states replace the last block's output by the final-normed one)."""
    blocks = []
    hooks = [layer.register_forward_hook(lambda m, i, o: blocks.append(o[0] if isinstance(o, tuple) else o))
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask if attention_mask is None else attention_mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out, blocks


# --------------------------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", MODEL_TYPES)
def test_every_layer_and_final_output_match_transformers(checkpoints, ours, name, side):
    # The contract of the reference implementation: same weights, same numbers, at every depth, for either padding
    # side. Pad positions are meaningless in both implementations, so only real tokens are compared.
    _, hf = checkpoints[name]
    ids, mask = padded_batch(side)
    ref, ref_blocks = hf_forward(hf, ids, mask)
    with torch.no_grad():
        out = ours[name](ids, mask, output_hidden_states=True)
    real = mask.bool()
    assert len(out.layer_hidden) == len(ref_blocks) + 1
    torch.testing.assert_close(out.layer_hidden[0][real], ref.hidden_states[0][real], **TOL)
    for layer, (a, b) in enumerate(zip(out.layer_hidden[1:], ref_blocks), start=1):
        torch.testing.assert_close(a[real], b[real], **TOL, msg=lambda m: f"block {layer}: {m}")
    torch.testing.assert_close(out.hidden[real], ref.hidden_states[-1][real], **TOL)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", MODEL_TYPES)
def test_selected_row_logits_equal_transformers_full_logits(checkpoints, ours, name, side):
    # The reranker reads only the "yes"/"no" rows at the last real token; those must be exactly HF's logits there,
    # for tied heads (embedding matrix reused) and untied ones (lm_head.weight).
    _, hf = checkpoints[name]
    model = ours[name]
    assert (model.lm_head is None) == (name in TIED)
    ids, mask = padded_batch(side)
    ref, _ = hf_forward(hf, ids, mask)
    pos = last_token_positions(mask)
    token_ids = torch.tensor([5, 17])
    with torch.no_grad():
        logits = model.lm_logits(model(ids, mask).hidden, positions=pos, token_ids=token_ids)
    assert logits.shape == (len(LENGTHS), 2)
    torch.testing.assert_close(logits, ref.logits[torch.arange(len(LENGTHS)), pos][:, token_ids], **TOL)


def test_tied_and_untied_heads_are_both_covered():
    # Guards the parametrisation above: both head layouts must stay in the reference set.
    assert TIED and set(MODEL_TYPES) - TIED


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", MODEL_TYPES)
def test_bidirectional_mode_matches_transformers_with_a_full_mask(checkpoints, ours, name, side):
    # causal=False lets every real token see every real token. transformers returns a 4D mask unchanged, and its
    # SDPA path drops is_causal when a mask is given, so a (B, 1, T, T) mask "all real keys" is its bidirectional
    # run. The diagonal is allowed too so pad query rows are not empty (an empty row is NaN and would spread
    # through pad values into later layers).
    _, hf = checkpoints[name]
    ids, mask = padded_batch(side)
    full = mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool)
    ref, ref_blocks = hf_forward(hf, ids, mask, attention_mask=full)
    with torch.no_grad():
        out = ours[name](ids, mask, causal=False, output_hidden_states=True)
        causal = ours[name](ids, mask).hidden
    real = mask.bool()
    for a, b in zip(out.layer_hidden[1:], ref_blocks):
        torch.testing.assert_close(a[real], b[real], **TOL)
    torch.testing.assert_close(out.hidden[real], ref.hidden_states[-1][real], **TOL)
    assert not torch.allclose(out.hidden[real], causal[real], atol=1e-3)  # the mode really changes the attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", MODEL_TYPES)
def test_sequence_outputs_do_not_depend_on_the_rest_of_the_batch(ours, name, side, causal):
    # Positions come from the mask and pad keys are hidden, so a sequence padded into a batch gives what it gives
    # alone (where no mask is built at all and SDPA takes its own causal path).
    model = ours[name]
    ids, mask = padded_batch(side)
    with torch.no_grad():
        batch = model(ids, mask, causal=causal).hidden
        for i in range(len(LENGTHS)):
            real = mask[i].bool()
            alone = model(ids[i:i + 1, real], causal=causal).hidden[0]
            torch.testing.assert_close(batch[i, real], alone, **TOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padded_batch_outputs_and_gradients_are_finite_everywhere(checkpoints, causal):
    # A left-padded pad query under a causal mask has no real key to attend to; the mask lets it attend to itself
    # so no kernel sees an empty row (NaN there would reach real tokens through the pad values and the backward).
    d, _ = checkpoints["qwen2"]
    model = load_pretrained(d)
    model.model.embed_tokens.weight.requires_grad_(True)
    ids, mask = padded_batch("left")
    hidden = model(ids, mask, causal=causal).hidden
    hidden.pow(2).mean().backward()  # all positions, pads included
    assert torch.isfinite(hidden).all()
    assert torch.isfinite(model.model.embed_tokens.weight.grad).all()


def test_bf16_load_gives_bf16_weights_and_outputs_close_to_transformers_bf16(checkpoints):
    d, hf = checkpoints["qwen3"]
    model = load_pretrained(d, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ids, mask = padded_batch("left")
    ref, _ = hf_forward(hf16, ids, mask)
    with torch.no_grad():
        out = model(ids, mask).hidden
        out32 = load_pretrained(d)(ids, mask).hidden
    real = mask.bool()
    assert out.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; after three random blocks a few percent of the output scale is the noise.
    scale = out32[real].abs().max()
    assert (out[real].float() - ref.hidden_states[-1][real].float()).abs().max() < 0.04 * scale  # seen: ~0.01
    assert (out[real].float() - out32[real]).abs().max() < 0.06 * scale  # seen: ~0.017


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints):
    # Frozen base + one trainable tensor in the first block: its gradient flows back through every later block,
    # which checkpointing recomputes in backward; the result must not change.
    d, _ = checkpoints["qwen3"]
    ids, mask = padded_batch("left")

    def grad(checkpointing):
        model = load_pretrained(d)
        w = model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
        model.gradient_checkpointing = checkpointing
        model.train()
        calls = []
        model.model.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
        model(ids, mask).hidden[mask.bool()].pow(2).mean().backward()
        return w.grad, len(calls)

    g_plain, calls_plain = grad(False)
    g_ckpt, calls_ckpt = grad(True)
    assert (calls_plain, calls_ckpt) == (1, 2)  # checkpointing really ran: the block was recomputed in backward
    assert g_plain is not None and g_plain.abs().sum() > 0
    torch.testing.assert_close(g_ckpt, g_plain, atol=1e-6, rtol=1e-5)


def test_loaded_base_is_frozen_and_in_eval_mode(ours):
    # moe_lora adds the trainable tensors; the backbone never trains by accident.
    model = ours["llama"]
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------------------------- bad checkpoints
def copy_checkpoint(checkpoints, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(checkpoints[name][0], dst)
    return dst


def edit_config(d, **changes):
    fn = d / "config.json"
    cfg = json.loads(fn.read_text())
    cfg.update(changes)
    fn.write_text(json.dumps(cfg))


def test_missing_directory_raises_naming_it(tmp_path):
    path = str(tmp_path / "no_such_model")
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*not found"):
        load_pretrained(path)


def test_missing_shard_raises_naming_the_shard(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints, SHARDED, tmp_path)
    shard = sorted(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())[-1]
    os.remove(d / shard)
    with pytest.raises(CheckpointError, match=re.escape(shard) + ".*missing"):
        load_pretrained(str(d))


def test_unknown_model_type_raises_naming_config_json_and_the_type(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints, "qwen3", tmp_path)
    edit_config(d, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"config\.json.*'gpt2'.*not supported"):
        load_pretrained(str(d))


def test_tensor_of_the_wrong_shape_raises_naming_key_and_file(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints, "qwen3", tmp_path)
    fn = d / "model.safetensors"
    tensors = load_file(fn)
    key = "model.layers.1.self_attn.k_proj.weight"
    tensors[key] = tensors[key][:-8].contiguous()
    save_file(tensors, fn, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(str(fn)) + f".*'{re.escape(key)}'.*shape"):
        load_pretrained(str(d))


def test_missing_and_unexpected_keys_are_listed(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints, "qwen3", tmp_path)
    fn = d / "model.safetensors"
    tensors = load_file(fn)
    tensors["model.layers.2.mlp.up_proj_renamed.weight"] = tensors.pop("model.layers.2.mlp.up_proj.weight")
    save_file(tensors, fn, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_pretrained(str(d))
    msg = str(e.value)
    assert re.search(r"missing: \['model\.layers\.2\.mlp\.up_proj\.weight'\]", msg)
    assert re.search(r"unexpected: \['model\.layers\.2\.mlp\.up_proj_renamed\.weight'\]", msg)


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},  # transformers 5.x layout
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},  # 4.x
    {"rope_scaling": {"type": "linear", "factor": 2.0}},  # older 4.x spelling
], ids=["rope_parameters-linear", "rope_scaling-yarn", "rope_scaling-type-linear"])
def test_scaled_rope_is_rejected_naming_the_key(checkpoints, tmp_path, rope):
    # Scaled RoPE would silently give wrong positions if ignored; it is not implemented, so loading must stop.
    d = copy_checkpoint(checkpoints, "qwen3", tmp_path)
    edit_config(d, **rope)
    key = next(iter(rope))
    with pytest.raises(ConfigError, match=rf"config\.json: {key} type '(linear|yarn)' is not supported"):
        load_pretrained(str(d))


def test_sequence_longer_than_an_active_sliding_window_is_rejected():
    # Mistral with a window: within it, attention is plain causal (supported); past it, it is not implemented.
    cfg = ModelConfig.from_hf_dict(dict(model_type="mistral", **TINY, sliding_window=8))
    assert cfg.sliding_window == 8
    torch.manual_seed(0)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        model(torch.ones(1, 8, dtype=torch.long))
        with pytest.raises(ConfigError, match="sliding_window 8"):
            model(torch.ones(1, 9, dtype=torch.long))


def test_inactive_sliding_window_is_ignored():
    # Qwen configs carry sliding_window even when use_sliding_window is false: that is full attention.
    cfg = ModelConfig.from_hf_dict(dict(model_type="qwen2", **TINY, sliding_window=4, use_sliding_window=False))
    assert cfg.sliding_window is None


# --------------------------------------------------------------------------------------------- config reading
def test_rope_theta_is_read_from_the_top_level_in_4x_configs():
    cfg = ModelConfig.from_hf_dict(dict(model_type="qwen2", **TINY, rope_theta=1e6, rope_scaling=None))
    assert cfg.rope_theta == 1e6


def test_rope_theta_is_read_from_rope_parameters_in_5x_configs():
    cfg = ModelConfig.from_hf_dict(dict(model_type="qwen3", **TINY,
                                        rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert cfg.rope_theta == 5e5


def test_saved_transformers_config_is_read_back(checkpoints):
    # What transformers 5.x actually writes (rope_parameters, layer_types, null sliding_window) reads back intact.
    cfg = ModelConfig.from_json(os.path.join(checkpoints["qwen3"][0], "config.json"))
    assert (cfg.head_dim, cfg.rope_theta, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm, cfg.sliding_window) == \
        (24, 1e6, True, True, True, None)


# Qwen3-0.6B's published config.json.
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_explicit_head_dim_wins_over_hidden_over_heads():
    # Qwen3-0.6B: 16 heads x 128 = 2048 != hidden 1024, so head_dim must come from the file, not 1024 / 16.
    cfg = ModelConfig.from_hf_dict(QWEN3_0_6B)
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 16, 8)
    assert (cfg.rope_theta, cfg.tie_word_embeddings, cfg.qk_norm, cfg.sliding_window) == (1e6, True, True, None)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (False, False, False)
    with torch.device("meta"):  # shapes only, no 0.6B allocation
        attn = CausalLM(cfg).model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2048, 1024)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (1024, 1024)
    assert attn.o_proj.weight.shape == (1024, 2048)
    assert attn.q_norm.weight.shape == (128,)
