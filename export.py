"""Export one task of a checkpoint as a plain Hugging Face directory: that task's experts merged into the base.

    python export.py CKPT OUT --task embed     # embedding model + sentence-transformers files
    python export.py CKPT OUT --task rerank    # causal LM scored with the Qwen3-Reranker template

Merging: W' = W + sum_i w_i s_i B_i A_i with the task's fixed expert weights w (moe_lora.fixed_weights: the task's
router.task_experts at weight 1, an always-on shared expert at 1), folded in fp32 by moe_lora.merge and cast to
the base dtype. That is the model's own output only where the task's routing ignores the input: a task router
(the task-routed modes: emb_only, rank_only, joint_single, hard_switch, hard_switch_shared) or always-on experts.
A learned or RouterRetriever router (router.kind learned / retriever) routes each input by its content, so it is
refused, and so are a quantised base (model.quant), bidirectional attention (model.bidirectional) and a reranker
whose head is not the yes/no LM head (train.rerank_head linear / e2rank / jina_v3).

Directory (both tasks): config.json (the base's, with `architectures` and `torch_dtype`), model.safetensors (the
merged CausalLM state dict under HF's parameter names; loads strictly with model.load_pretrained), the run's
tokenizer files (tokenizer_config.json gains padding_side left and a pad token), generation_config.json if the
base has one. Embedding: modules.json (Transformer -> Pooling -> Normalize), sentence_bert_config.json
(max_seq_length = data.max_doc_len), 1_Pooling/config.json (last-token pooling), 2_Normalize/,
config_sentence_transformers.json (prompts: query = `Instruct: {data.embed_instruction}\\nQuery:`, document = "");
with data.append_eos the tokenizer.json post-processor appends the EOS UniMoER appends (`<|endoftext|>` when the
vocabulary has it), as Qwen3-Embedding's published tokenizer does, so any HF tokenizer call reproduces our ids.
Reranker: reranker_template.json (prefix, pair format, suffix and their token ids, max length, yes/no ids).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

import moe_lora
from config import RERANK_PREFIX, RERANK_SUFFIX, format_query, format_rerank_pair, mode_tasks
from model import ArgumentParser, CausalLM, run_cli
from unimoer import UniMoER, load_run

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM"}
# Tokenizer files of an HF directory (whichever exist are copied)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")
TEMPLATE_FILE = "reranker_template.json"
FIXED_KINDS = ("task",)  # router kinds whose weights depend on the task only


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (an input error: one line through run_cli)."""


# --------------------------------------------------------------------------------------------- what can be merged
def check_exportable(um: UniMoER, task: str) -> None:
    """One ExportError naming the config key when `task` of this model is not a fixed merge of its experts."""
    cfg = um.cfg
    if task not in ("embed", "rerank"):
        raise ExportError(f"--task must be 'embed' or 'rerank' (got {task!r})")
    if task not in mode_tasks(cfg.train.mode):
        raise ExportError(f"train.mode {cfg.train.mode!r} trains {mode_tasks(cfg.train.mode)} only; it has no "
                          f"trained {task} experts to export")
    spec = moe_lora.get_config(um.base)
    if spec.routed_experts and cfg.router.kind not in FIXED_KINDS:
        raise ExportError(f"router.kind {cfg.router.kind!r} (train.mode {cfg.train.mode!r}) weighs the experts by "
                          "each input's content, so no single set of merged weights reproduces it; export a "
                          "task-routed mode (emb_only, rank_only, joint_single, hard_switch, hard_switch_shared)")
    if cfg.model.quant != "none":
        raise ExportError(f"model.quant {cfg.model.quant!r}: merging a LoRA delta into integer weights would "
                          "re-quantise W + BA; export from the full-precision base (model.quant: none), then "
                          "quantise the exported directory")
    if cfg.model.bidirectional:
        raise ExportError("model.bidirectional true: the exported directory is a causal HF model, whose attention "
                          "would differ from the trained bidirectional one")
    if task == "rerank" and cfg.train.rerank_head != "yesno":
        raise ExportError(f"train.rerank_head {cfg.train.rerank_head!r}: only the 'yesno' head (logit(yes) - "
                          "logit(no) from the LM head) is a plain causal-LM reranker; 'linear' needs its own head "
                          "and 'e2rank' is the embedding model (export --task embed)")


def merged_state_dict(um: UniMoER, task: str) -> dict:
    """{HF name: tensor} of the base with `task`'s experts merged (moe_lora.merge, then unmerged again: `um` is
    left as it was, up to fp32 rounding of a bf16 base), exactly the keys of a plain CausalLM."""
    with torch.device("meta"):
        plain = set(CausalLM(um.base.config).state_dict())
    moe_lora.merge(um.base, task)
    try:
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in um.base.state_dict().items() if k in plain}
    finally:
        moe_lora.unmerge(um.base)
    missing = sorted(plain - set(state))
    if missing:
        raise RuntimeError(f"export: merged state dict lacks {missing[:5]}")
    return state


# --------------------------------------------------------------------------------------------- files
def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def write_model(um: UniMoER, task: str, out: str) -> None:
    """config.json, model.safetensors and generation_config.json (if the base has one)."""
    state = merged_state_dict(um, task)
    src = um.cfg.model.path
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    hf["architectures"] = [ARCHITECTURES[um.base.config.model_type]]
    hf["torch_dtype"] = _dtype_name(next(iter(state.values())).dtype)
    hf.pop("quantization_config", None)
    _write_json(os.path.join(out, "config.json"), hf)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    gen = os.path.join(src, "generation_config.json")
    if os.path.isfile(gen):
        shutil.copy(gen, os.path.join(out, "generation_config.json"))


def write_tokenizer(um: UniMoER, task: str, out: str) -> None:
    """The run's tokenizer files; tokenizer_config.json with padding_side left, the pad token UniMoER pads with
    and model_max_length (the task's longest input). The embedding with data.append_eos: tokenizer.json's
    post-processor also appends the EOS (after whatever the original post-processor adds), unless it already ends
    every sequence with it; checked on a sample text. The reranker's template is read without special tokens, so
    its tokenizer.json is copied unchanged."""
    src = os.path.dirname(um.tok.source)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    tok_cfg_path = os.path.join(out, "tokenizer_config.json")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if os.path.isfile(tok_cfg_path):
        with open(tok_cfg_path) as f:
            tok_cfg = json.load(f)
    tok_cfg.setdefault("eos_token", um.tok.eos_token)
    tok_cfg["pad_token"] = um.tok.tok.id_to_token(um.tok.pad_id)
    tok_cfg["padding_side"] = "left"
    d = um.cfg.data
    tok_cfg["model_max_length"] = max(d.max_doc_len, d.max_query_len) if task == "embed" else d.max_pair_len
    _write_json(tok_cfg_path, tok_cfg)
    if task != "embed" or not d.append_eos:
        return
    tok = HFTokenizer.from_file(os.path.join(out, "tokenizer.json"))
    eos, eos_id = um.tok.eos_token, um.tok.eos_id
    if tok.encode("a").ids[-1:] == [eos_id]:
        return  # the tokenizer appends it already (Qwen3-Embedding's does)
    append = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                           special_tokens=[(eos, eos_id)])
    tok.post_processor = append if tok.post_processor is None else processors.Sequence([tok.post_processor, append])
    if tok.encode("a").ids[-1:] != [eos_id]:
        raise RuntimeError(f"export: the post-processor of {um.tok.source} does not end with {eos!r} after appending")
    tok.save(os.path.join(out, "tokenizer.json"))


def write_sentence_transformers(um: UniMoER, out: str) -> None:
    """modules.json, sentence_bert_config.json, 1_Pooling/config.json, 2_Normalize/, config_sentence_transformers.json
    (the layout of Qwen3-Embedding's published files)."""
    d, h = um.cfg.data, um.base.config.hidden_size
    _write_json(os.path.join(out, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    _write_json(os.path.join(out, "sentence_bert_config.json"), {"max_seq_length": d.max_doc_len,
                                                                  "do_lower_case": False})
    _write_json(os.path.join(out, "1_Pooling", "config.json"), {
        "word_embedding_dimension": h, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True})
    os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
    _write_json(os.path.join(out, "config_sentence_transformers.json"), {
        "model_type": "SentenceTransformer",
        "prompts": {"query": format_query("", d.embed_instruction), "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine"})


def reranker_template(um: UniMoER) -> dict:
    """What UniMoER.tokens_pairs / rerank_scores do, as data: ids = prefix_ids + the pair's ids (no special
    tokens) truncated to max_length - len(prefix_ids) - len(suffix_ids) + suffix_ids; score = logit(yes) -
    logit(no) at the last token. rerank_prompt bare: no prefix, the suffix is the EOS alone."""
    d, tok = um.cfg.data, um.tok
    bare = d.rerank_prompt == "bare"
    return {"rerank_prompt": d.rerank_prompt, "prefix": "" if bare else RERANK_PREFIX,
            "pair_format": format_rerank_pair("{query}", "{document}", "{instruction}"),
            "instruction": d.rerank_instruction, "suffix": tok.eos_token if bare else RERANK_SUFFIX,
            "prefix_ids": list(um.prefix_ids), "suffix_ids": list(um.suffix_ids), "add_special_tokens": False,
            "max_length": d.max_pair_len, "truncation": "the pair's tokens only, to max_length - len(prefix_ids) - "
            "len(suffix_ids); prefix and suffix are never cut",
            "yes_token": "yes", "no_token": "no", "yes_id": tok.token_id("yes"), "no_id": tok.token_id("no"),
            "score": "logits[yes_id] - logits[no_id] at the last token"}


# --------------------------------------------------------------------------------------------- export
def export(um: UniMoER, task: str, out: str) -> None:
    """Write `task` of `um` as an HF directory `out` (new or empty)."""
    check_exportable(um, task)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out}: exists and is not an empty directory")
    os.makedirs(out, exist_ok=True)
    write_model(um, task, out)
    write_tokenizer(um, task, out)
    if task == "embed":
        write_sentence_transformers(um, out)
    else:
        _write_json(os.path.join(out, TEMPLATE_FILE), reranker_template(um))


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="export.py", description="Merge one task's experts into the base and write a plain "
                       "HF directory (embed: + sentence-transformers files; rerank: causal LM + its template).")
    p.add_argument("ckpt", help="run or checkpoint directory")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--task", choices=("embed", "rerank"), required=True)
    a = p.parse_args(argv)
    um = load_run(a.ckpt)
    export(um, a.task, a.out)
    print(f"wrote {a.out} ({a.task}, train.mode {um.cfg.train.mode})")
    return 0


def cli(argv=None) -> int:
    return run_cli("export.py", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
