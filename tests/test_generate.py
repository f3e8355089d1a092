"""generate.py and model.py's KV cache, read as the spec.

The reference is transformers' own `generate` on a tiny random Qwen3 checkpoint written with save_pretrained and
loaded back with load_pretrained (as in test_model.py), so the same weights run through both implementations.
Experts: tiny random CausalLMs with attached MoE-LoRA experts, against the plain base and moe_lora.merge.
"""
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import moe_lora as ML  # noqa: E402
from generate import generate, top_k_filter, top_p_filter  # noqa: E402
from model import CausalLM, KVCache, ModelConfig, load_pretrained  # noqa: E402
from moe_lora import MoELoRAConfig  # noqa: E402
from router import RouterConfig  # noqa: E402

VOCAB, T, NEW = 128, 9, 32
LENGTHS = (9, 3, 6)  # one full-length prompt, two left-padded ones
PAD = 0
# test_model.py's qwen3 case: head_dim != hidden / heads, q/k norm, attention biases, untied head, theta 1e6
QWEN3 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, attention_bias=True, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(our model, transformers' Qwen3ForCausalLM) with the same random weights, both fp32 in eval mode."""
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3)).eval()
    with torch.no_grad():  # HF init is near-trivial (unit norms, zero biases): randomise everything
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.15)
    d = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(d)
    return load_pretrained(str(d)), hf


def prompts(seed: int = 0):
    """Random ids (3, T), LENGTHS real tokens left-padded with PAD, and the (3, T) mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), T), generator=g)
    mask = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, T - n:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def hf_generate(hf, ids, mask, **kwargs):
    """transformers' new tokens (B, N); no eos unless given, so it runs the full length."""
    kwargs = {"eos_token_id": None, "pad_token_id": PAD, "max_new_tokens": NEW, "do_sample": False, **kwargs}
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def greedy(pair):
    """Our greedy tokens (3, NEW) for prompts(), with the cache."""
    ids, mask = prompts()
    return generate(pair[0], ids, mask, NEW)


# --------------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_cached_chunks_give_the_full_forwards_hidden_states(pair, padded):
    # The prompt in chunks of 4, 3, 1, 1 tokens over one KVCache equals one forward over the whole sequence at
    # every real position: several new tokens after a past (explicit mask) and one (no mask when unpadded).
    model = pair[0]
    ids, mask = prompts()
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        full = model(ids, mask).hidden
        cache, parts, start = KVCache(), [], 0
        for n in (4, 3, 1, 1):
            parts.append(model(ids[:, start:start + n], mask[:, :start + n], cache=cache).hidden)
            start += n
    assert cache.length == T and len(cache.keys) == QWEN3["num_hidden_layers"]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, dim=1)[real], full[real], atol=1e-5, rtol=1e-5)


def test_a_cache_with_a_mask_of_the_wrong_length_is_a_clear_error(pair):
    model, cache = pair[0], KVCache()
    ids, mask = prompts()
    with torch.no_grad():
        model(ids, mask, cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 1\), expected \(3, 10\)"):
            model(ids[:, :1], mask[:, :1], cache=cache)  # the mask must cover the cached tokens too


# --------------------------------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_tokens_equal_transformers_generate(pair, use_cache):
    # The acceptance test: 32 new tokens for a left-padded batch of 3 prompts of different lengths, both paths.
    model, hf = pair
    ids, mask = prompts()
    ours = generate(model, ids, mask, NEW, use_cache=use_cache)
    ref = hf_generate(hf, ids, mask)
    assert ours.shape == ref.shape == (3, NEW)
    assert torch.equal(ours, ref)


def test_a_prompt_generates_the_same_tokens_alone_and_left_padded_in_a_batch(pair, greedy):
    # Positions come from the mask: the padding a batch adds changes nothing.
    ids, mask = prompts()
    for i in range(len(LENGTHS)):
        alone = generate(pair[0], ids[i:i + 1, mask[i].bool()], None, NEW)
        assert torch.equal(alone[0], greedy[i])


def test_sampled_tokens_equal_transformers_sampling_under_the_same_seed(pair):
    # The whole sampling chain (temperature, top-k, top-p, multinomial) against transformers': both draw one
    # torch.multinomial sample per step from the global RNG, so the same seed gives the same draws when the
    # filtered distributions are the same.
    model, hf = pair
    ids, mask = prompts()
    args = dict(do_sample=True, temperature=1.7, top_k=20, top_p=0.8)
    torch.manual_seed(123)
    ours = generate(model, ids, mask, NEW, **args)
    torch.manual_seed(123)
    ref = hf_generate(hf, ids, mask, **args)
    assert torch.equal(ours, ref)


# --------------------------------------------------------------------------------------------- stop, length
def test_a_stop_token_ends_its_row_and_pads_the_rest_as_transformers_does(pair, greedy):
    # Stop on the token row 0 emits at step 4: each row ends at its first occurrence (kept) and is padded after;
    # rows that never emit it run the full length. transformers with the same eos list gives the same.
    model, hf = pair
    ids, mask = prompts()
    stop = int(greedy[0, 4])
    pad = VOCAB - 1
    out = generate(model, ids, mask, NEW, stop_ids=[stop], pad_id=pad)
    expected = greedy.clone()
    for i in range(len(LENGTHS)):
        hits = (greedy[i] == stop).nonzero()
        if len(hits):
            expected[i, int(hits[0]) + 1:] = pad
    assert (expected == pad).any() and not (expected == pad).all(dim=1).any()  # someone stopped, nobody at once
    assert torch.equal(out, expected[:, :out.shape[1]]) and out.shape[1] == NEW  # a row ran to the end
    assert torch.equal(out, hf_generate(hf, ids, mask, eos_token_id=[stop], pad_token_id=pad))


def test_generation_ends_when_every_row_has_stopped(pair, greedy):
    # Each row's step-1 token is a stop id: every row ends by step 2 at the latest, and the output is that short.
    ids, mask = prompts()
    stops = greedy[:, 1].tolist()
    out = generate(pair[0], ids, mask, NEW, stop_ids=stops, pad_id=PAD)
    first = [min(int((greedy[i] == s).nonzero()[0]) for s in stops if (greedy[i] == s).any())
             for i in range(len(LENGTHS))]
    assert out.shape == (3, max(first) + 1) and out.shape[1] <= 2
    for i, f in enumerate(first):
        assert torch.equal(out[i, :f + 1], greedy[i, :f + 1]) and (out[i, f + 1:] == PAD).all()


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_bounds_the_output(pair, greedy, n):
    ids, mask = prompts()
    out = generate(pair[0], ids, mask, n)
    assert torch.equal(out, greedy[:, :n])


def test_right_padded_prompts_and_bad_arguments_are_clear_errors(pair):
    model = pair[0]
    ids, mask = prompts()
    with pytest.raises(ValueError, match="must be left-padded"):
        generate(model, ids, mask.flip(1))
    for kwargs, what in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(do_sample=True, temperature=0.0),
                         "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=what):
            generate(model, ids, mask, **kwargs)


# --------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_the_seed_matters(pair):
    ids, mask = prompts()

    def sample(seed):
        return generate(pair[0], ids, mask, NEW, do_sample=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_sampling_with_and_without_cache_draws_the_same_tokens(pair, use_cache):
    # Same logits at every step and the same generator: the two paths are interchangeable for sampling too.
    ids, mask = prompts()
    args = dict(do_sample=True, temperature=1.3, top_k=30, top_p=0.9)
    ref = generate(pair[0], ids, mask, NEW, use_cache=True, generator=torch.Generator().manual_seed(7), **args)
    out = generate(pair[0], ids, mask, NEW, use_cache=use_cache, generator=torch.Generator().manual_seed(7), **args)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("args", [dict(top_k=1), dict(temperature=1e-4), dict(top_p=1e-6)],
                         ids=["top_k=1", "temperature->0", "top_p->0"])
def test_degenerate_sampling_equals_greedy(pair, greedy, args):
    # top_k 1 and a nucleus of one token leave only the argmax; temperature -> 0 puts all mass on it
    # (exp(-gap / 1e-4) underflows for every logit gap above ~1e-2).
    ids, mask = prompts()
    out = generate(pair[0], ids, mask, NEW, do_sample=True, generator=torch.Generator().manual_seed(0), **args)
    assert torch.equal(out, greedy)


def test_top_k_and_top_p_filters_equal_transformers_warpers():
    # The filters on their own against transformers' TopKLogitsWarper / TopPLogitsWarper on random logits.
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 3
    for k in (1, 5, 49):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.05, 0.5, 0.9, 0.999):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


def test_top_p_keeps_the_smallest_set_reaching_p_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05: p = 0.8 keeps the first two (0.5 + 0.3 reaches 0.8), p = 0.81 three,
    # p = 0.5 only the first; the order of the vocabulary does not matter.
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    for p, kept in [(0.5, [1]), (0.8, [1, 3]), (0.81, [0, 1, 3]), (1.0, [0, 1, 2, 3])]:
        assert torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist() == kept, p


# --------------------------------------------------------------------------------------------- experts
TINY = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def tiny_base(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf_dict(TINY))
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.3)
    return model.requires_grad_(False).eval()


def with_experts(kind: str = "task") -> CausalLM:
    """tiny_base() with embed / rerank / always-on shared experts on every projection, B randomised (B = 0 at
    init would make the experts a no-op)."""
    model = ML.attach(tiny_base(), MoELoRAConfig(router=RouterConfig(kind=kind)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in ML._linears(model):
            lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_adapters_off_generates_what_the_plain_base_generates(use_cache):
    ids, mask = prompts()
    model = with_experts()
    off = generate(model, ids, mask, NEW, use_cache=use_cache, adapters=False)
    assert torch.equal(off, generate(tiny_base(), ids, mask, NEW, use_cache=use_cache))
    with ML.fixed_routing(model, "embed"):  # the experts do change the tokens when on
        assert not torch.equal(generate(model, ids, mask, NEW), off)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("routing", ["embed", "rerank", {"embed": 0.3, "rerank": 0.7}])
def test_generation_with_a_fixed_routing_equals_generation_from_the_merged_base(routing, use_cache):
    # fixed_routing gives every linear the gate merge folds into the weights: same tokens, cached K/V included
    # (q/k/v carry the LoRA delta under the one fixed gate).
    ids, mask = prompts()
    model = with_experts()
    with ML.fixed_routing(model, routing):
        fixed = generate(model, ids, mask, NEW, use_cache=use_cache)
    ML.merge(model, routing)
    assert torch.equal(fixed, generate(model, ids, mask, NEW, use_cache=use_cache))


def test_different_experts_generate_different_tokens():
    # Guards the test above: a fixed routing that ignored its argument would pass it.
    ids, mask = prompts()
    model = with_experts()
    out = {}
    for task in ("embed", "rerank"):
        with ML.fixed_routing(model, task):
            out[task] = generate(model, ids, mask, NEW)
    assert not torch.equal(out["embed"], out["rerank"])


@pytest.mark.parametrize("kind", ["learned", "task", "retriever"])
def test_a_router_that_needs_the_input_or_task_ids_is_refused_naming_its_kind(kind):
    ids, mask = prompts()
    model = with_experts(kind)
    with pytest.raises(ValueError, match=f"router.kind '{kind}'.*fixed_routing"):
        generate(model, ids, mask, 4)
    with ML.fixed_routing(model, "rerank"):  # allowed once fixed
        assert generate(model, ids, mask, 4).shape == (3, 4)
