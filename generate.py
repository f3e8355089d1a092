"""Text generation from model.py's CausalLM: greedy and sampled decoding, with a KV cache or without.

    generate(model, input_ids, attention_mask, max_new_tokens) -> (B, N) new token ids, N <= max_new_tokens

Prompts are left-padded, so the last column holds every row's last real token; positions come from the attention
mask (cumsum - 1), as transformers computes them for left padding, and a prompt gives the same tokens whatever its
padding. Each step takes the LM-head logits z (B, V) at the last position and picks
    greedy:   next = argmax z
    sampled:  z / temperature -> the top_k largest kept -> the nucleus kept (the smallest set of most probable
              tokens whose probability sum reaches top_p; Holtzman et al. 2020) -> one draw from softmax with the
              caller's torch.Generator; the order of transformers' Temperature, TopK and TopP logits warpers.
A row that emitted a stop id is finished and emits pad_id from then on; the loop ends once every row is finished or
after max_new_tokens steps. use_cache=True runs the prompt once, then one token per step over a model.KVCache;
use_cache=False recomputes the whole sequence at every step (the reference path: the same tokens).

Experts: adapters=False generates from the plain base. With the experts on, their gate must not depend on the
input, because a cached step sees its new token only (and a full recompute would re-route over the growing
sequence): generate inside moe_lora.fixed_routing(model, routing) (one task's experts, e.g. "embed", or any fixed
mix), on a model merged with moe_lora.merge, or with only always-on experts. Routers that read the input (learned,
retriever) and task routers (per-row task ids) are refused with an error naming the router kind.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from model import CausalLM, KVCache


def check_fixed_routing(model: CausalLM, adapters: bool) -> None:
    """Raise unless every adapted block's gate ignores the input (or the experts are off)."""
    if not adapters:
        return
    for i, block in enumerate(model.model.layers):
        hook = block.adapter_hook
        if hook is not None and not hook.routing_is_fixed:
            kind = model.moe_lora_config.router.kind
            raise ValueError(f"generate: layer {i}'s experts are routed by the input (router.kind {kind!r}); "
                             "generate with adapters=False, inside moe_lora.fixed_routing(model, routing), or on "
                             "a model merged with moe_lora.merge")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V): keep each row's k largest logits (values tied with the k-th are kept too), the rest -inf.
    k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) nucleus: token j is kept iff the tokens more probable than j hold less than p of the probability,
    i.e. the smallest set of most probable tokens whose sum reaches p (never empty). p = 1 keeps all."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p  # mass strictly before each token, in sorted order
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids: argmax, or one draw from the filtered softmax."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _check_args(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate: the prompts must be left-padded (a row's last attention_mask column is 0)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0, got {temperature} (do_sample=False is greedy)")
    if top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model: CausalLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 32, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None, stop_ids: Sequence[int] = (),
             pad_id: int = 0, use_cache: bool = True, adapters: bool = True) -> torch.Tensor:
    """Left-padded prompts input_ids, attention_mask (B, T) -> the new tokens (B, N), N <= max_new_tokens
    (N < max_new_tokens only when every row stopped). A row's stop id is kept and followed by pad_id.
    The model runs in eval mode (restored after); the routing rule for experts is in the module docstring."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_args(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    check_fixed_routing(model, adapters)
    was_training = model.training
    model.eval()
    try:
        B, dev = input_ids.shape[0], input_ids.device
        ids, mask = input_ids, attention_mask.long()  # (B, S): prompt and the tokens so far
        step_ids = ids  # what the cached path runs next: the prompt, then one token per step
        cache = KVCache() if use_cache else None
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        out = []
        for _ in range(max_new_tokens):
            if use_cache:
                hidden = model(step_ids, mask, adapters=adapters, cache=cache).hidden
            else:
                hidden = model(ids, mask, adapters=adapters).hidden
            logits = model.lm_logits(hidden[:, -1]).float()  # (B, V)
            token = next_token(logits, do_sample, temperature, top_k, top_p, generator)
            token = token.masked_fill(finished, pad_id)  # (B,)
            out.append(token)
            finished |= torch.isin(token, stop)
            if bool(finished.all()):
                break
            step_ids = token[:, None]  # (B, 1)
            mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
            if not use_cache:
                ids = torch.cat((ids, step_ids), dim=1)
        return torch.stack(out, dim=1)
    finally:
        model.train(was_training)


def generate_text(model: CausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                  max_prompt_len: int = 512, stop_ids: Optional[Sequence[int]] = None, **kwargs) -> list:
    """Strings in, strings out: the prompts tokenized and left-padded (model.Tokenizer), generate(...), and each
    row decoded up to its first stop id (excluded). stop_ids default to the tokenizer's eos; kwargs go to
    generate (do_sample, temperature, top_k, top_p, generator, use_cache, adapters)."""
    stop_ids = [tokenizer.eos_id] if stop_ids is None else list(stop_ids)
    batch = tokenizer(list(prompts), max_length=max_prompt_len, padding_side="left")
    dev = next(model.parameters()).device
    new = generate(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev), max_new_tokens,
                   stop_ids=stop_ids, pad_id=tokenizer.pad_id, **kwargs)
    texts = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        texts.append(tokenizer.decode(row[:cut]))
    return texts
