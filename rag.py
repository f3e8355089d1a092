"""Retrieval-augmented generation from one frozen base (Exp 6): retrieve -> rerank -> generate, in one process.

Usage
-----
    python rag.py CKPT --data BEIR_DIR --qa QA.jsonl                        # -> CKPT/rag/<dataset>/
    python rag.py ckpt/tiny --data data/synthetic-tiny --qa data/synthetic-tiny/qa.jsonl
    python rag.py CKPT --data DIR --qa QA --k-retrieve 20 --k-rerank 5 --k-context 3 --max-new-tokens 32
    python rag.py CKPT --data DIR --qa QA --gen-routing rerank               # generate with the rerank task's experts
    python rag.py CKPT --data DIR --qa QA --gen-routing embed=0.5,rerank=0.5 # ... or any fixed mix
    python rag.py CKPT --data DIR --qa QA --reranker CKPT2 --generator DIR   # baseline: separate models
    python rag.py /tmp/smollm2 --data DIR --qa QA --data.append_eos=false    # a plain model directory (bare base)

Writes <out>/predictions.jsonl and <out>/metrics.json (default out: <CKPT>/rag/<dataset>) and prints one JSON
summary line on stdout; a missing file or malformed input stops with one error naming it (exit code 2).

One base. CKPT retrieves with its embedding path (UniMoER.encode_queries / encode_documents: the question gets
the model's query instruction, the whole corpus is encoded into a flat faiss index), reranks each question's top
k_retrieve's first k_rerank with its reranking path (score_pairs), and generates the answer from the same CausalLM
object (um.base) with the adapters off (default) or with a fixed routing, moe_lora.fixed_routing(base, routing):
a task name or {expert: weight}. Retrieval and reranking take the model's normal paths, a learned router
included; generation never uses a learned router (a KV cache needs a gate that does not depend on the input).
--reranker CKPT2 reranks with a second model, --generator DIR generates with another one: the two-models
baseline in the same harness (each loaded as evaluate.py loads a model: run, checkpoint or plain model directory).

Prompt (no chat template; PROMPT and PASSAGE below): the top k_context reranked documents in rank order, each cut
to max_passage_len tokens (default: the model's data.max_doc_len), then the question:
    Answer the question using the passages.\\n\\nPassage 1: {doc}\\nPassage 2: {doc}\\n...\\nQuestion: {q}\\nAnswer:
Greedy decoding (generate.generate, left-padded batches, KV cache) stops at the generator's EOS or after
max_new_tokens; the prediction is the generated text up to its first newline, stripped.

Metrics (ir.py): EM and F1 with SQuAD v1.1's normalisation, each the max over the gold answers, averaged over the
questions; answer recall@k_context (ir.has_answer: a gold answer's normalised tokens in one of the top k_context
documents, whole texts), after reranking (the generator's context) and of the dense retrieval alone. Costs:
seconds per question of each stage (query encoding + search, reranking, generation; each stage runs batched over
all questions and is divided by their number), the one-off corpus encoding and index build, peak memory
(evaluate.peak_memory: peak RSS on CPU, max_memory_allocated on CUDA), and parameter bytes: those held (every
distinct tensor of the loaded models, counted once) and evaluate.param_costs of each model (unified against
two separate single-task models).

Reading order: prompt and answers (parse_routing, truncate, build_prompt, answer_text) -> metrics (score_example,
aggregate) -> models (RagModels, load_models, held_param_bytes) -> stages (retrieve_stage, rerank_stage,
generate_stage, run_pipeline) -> rag_checkpoint (the whole evaluation, costs, provenance, write_rag) -> CLI.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NamedTuple, Optional, Sequence, Union

import torch

import data
import moe_lora
import quant
from evaluate import git_commit, param_costs, peak_memory, stage_timer
from generate import generate
from ir import EvalError, has_answer, qa_scores, rank_documents, write_text_atomic
from model import ArgumentParser, CausalLM, UsageError, run_cli
from retrieval import build_index, dense_run, encode_corpus, encode_queries, rerank
from unimoer import UniMoER, load_model, model_settings, setup_distributed, sha256_file

PROMPT = "Answer the question using the passages.\n\n{passages}\nQuestion: {question}\nAnswer:"
PASSAGE = "Passage {i}: {text}\n"  # i = 1 .. k_context, in rank order


def _log(msg: str) -> None:
    print(f"[rag] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- prompt and answers
def parse_routing(spec: str) -> Union[None, str, dict]:
    """--gen-routing: "none" -> None (adapters off), a task name ("embed") -> that string, "name=w,name=w" ->
    {name: float(w)} (moe_lora.fixed_weights checks the names against the model's experts)."""
    spec = spec.strip()
    if spec == "none":
        return None
    if "=" not in spec:
        if not spec:
            raise EvalError("--gen-routing must be 'none', a task name or name=weight,...; got ''")
        return spec
    out = {}
    for part in spec.split(","):
        name, sep, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise EvalError(f"--gen-routing: {part!r} is not name=weight (in {spec!r})")
    return out


def truncate(tok, text: str, n: int) -> str:
    """text cut to its first n tokens (no special tokens added), decoded back; unchanged when it is shorter."""
    ids = tok.encode_ids([text], 10**9, add_special_tokens=False)[0]
    return text if len(ids) <= n else tok.decode(ids[:n])


def build_prompt(question: str, passages: Sequence[str]) -> str:
    """PROMPT with the passages numbered from 1 in the given (rank) order."""
    return PROMPT.format(passages="".join(PASSAGE.format(i=i, text=p) for i, p in enumerate(passages, 1)),
                         question=question)


def answer_text(generated: str) -> str:
    """The prediction: the generated text up to its first newline, stripped."""
    return generated.strip().split("\n", 1)[0].strip()


# --------------------------------------------------------------------------------------------- metrics
def score_example(prediction: str, answers: Sequence[str], context: Sequence[str],
                  retrieved: Sequence[str]) -> dict:
    """One question: {"em", "f1"} (ir.qa_scores: max over the gold answers), "hit" (a gold answer in the context
    documents) and "retrieval_hit" (in the dense retrieval's documents at the same depth)."""
    return {**qa_scores(prediction, answers), "hit": float(any(has_answer(t, answers) for t in context)),
            "retrieval_hit": float(any(has_answer(t, answers) for t in retrieved))}


def aggregate(records: Sequence[dict], k_context: int) -> dict:
    """The means over the questions of em, f1, hit (answer_recall@k) and retrieval_hit."""
    if not records:
        raise EvalError("no question to aggregate")
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    return {"em": mean("em"), "f1": mean("f1"), f"answer_recall@{k_context}": mean("hit"),
            f"retrieval_answer_recall@{k_context}": mean("retrieval_hit")}


# --------------------------------------------------------------------------------------------- models
class RagModels(NamedTuple):
    """What the pipeline runs: retriever and reranker (UniMoER encoders), the generator (a CausalLM) and its
    tokenizer, and evaluate.py's load info per role ({"retriever", "reranker"?, "generator"?})."""
    retriever: UniMoER
    reranker: UniMoER
    generator: CausalLM
    gen_tok: object
    infos: dict


def load_models(ckpt: str, reranker: Optional[str] = None, generator: Optional[str] = None, device="cpu",
                max_doc_len: Optional[int] = None, overrides: Sequence[str] = ()) -> RagModels:
    """CKPT alone: one UniMoER, whose base also generates (reranker is retriever, generator is retriever.base).
    reranker / generator: further models (unimoer.load_model: run, checkpoint or plain model directory; the
    generator's base and tokenizer are used)."""
    um, info = load_model(ckpt, device, max_doc_len, overrides)
    infos = {"retriever": info}
    rr = um
    if reranker is not None:
        rr, infos["reranker"] = load_model(os.fspath(reranker), device, max_doc_len, overrides)
    gen, gen_tok = um.base, um.tok
    if generator is not None:
        g, infos["generator"] = load_model(os.fspath(generator), device, None, overrides)
        gen, gen_tok = g.base, g.tok
    return RagModels(um, rr, gen, gen_tok, infos)


def held_param_bytes(models: RagModels) -> int:
    """Bytes (numel x element size) of every distinct parameter and buffer tensor (a quantised base's codes) of the
    loaded models, each counted once: one UniMoER gives evaluate.param_costs(um)["unified_bytes"]."""
    seen = {}
    for m in (models.retriever, models.reranker, models.generator):
        for p in [*m.parameters(), *quant.code_tensors(m)]:
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------- stages
class Settings(NamedTuple):
    """The pipeline's depths, lengths and batch sizes (rag_checkpoint checks them)."""
    k_retrieve: int = 20
    k_rerank: int = 5
    k_context: int = 3
    max_new_tokens: int = 32
    max_passage_len: Optional[int] = None  # None: the retriever's data.max_doc_len
    routing: Union[None, str, dict] = None  # generation: None = adapters off, else moe_lora.fixed_routing's
    batch_size: int = 64  # texts per encoding batch; reranking uses half
    gen_batch_size: int = 8  # prompts per generation batch


def retrieve_stage(um: UniMoER, corpus: dict, questions: dict, s: Settings, timed, progress) -> dict:
    """Dense run {qid: {doc: score}} of the top k_retrieve (corpus encoding and index build timed apart)."""
    doc_ids = list(corpus)
    doc_emb = timed("corpus_encode_s", lambda: encode_corpus(um, doc_ids, [corpus[d] for d in doc_ids],
                                                             s.batch_size, progress))
    index = timed("index_build_s", lambda: build_index(doc_emb, "flat"))
    qids = list(questions)

    def query_side():
        q_emb = encode_queries(um, [questions[q] for q in qids], s.batch_size, progress)
        return dense_run(qids, q_emb, doc_ids, index, s.k_retrieve, drop_self=False)

    return timed("retrieval_s", query_side)


def generate_stage(gen: CausalLM, tok, prompts: Sequence[str], s: Settings, timed, dev) -> tuple:
    """Greedy answers for the prompts, in batches of gen_batch_size prompts of similar length (left-padded; a
    prompt's tokens do not depend on its batch) -> (generated texts, new tokens per prompt, prompt tokens)."""
    ids = tok.encode_ids(list(prompts), 10**9)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    texts, n_new = [""] * len(ids), [0] * len(ids)
    stop = [tok.eos_id]

    def run():
        for start in range(0, len(order), s.gen_batch_size):
            rows = order[start:start + s.gen_batch_size]
            batch = tok.pad([ids[i] for i in rows], padding_side="left")
            new = generate(gen, batch["input_ids"].to(dev), batch["attention_mask"].to(dev), s.max_new_tokens,
                           stop_ids=stop, pad_id=tok.pad_id, adapters=s.routing is not None)
            for i, row in zip(rows, new.tolist()):
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                texts[i], n_new[i] = tok.decode(row[:cut]), min(cut + 1, len(row))  # the stop token counts

    if s.routing is None:
        timed("generation_s", run)
    else:
        with moe_lora.fixed_routing(gen, s.routing):
            timed("generation_s", run)
    return texts, n_new, [len(x) for x in ids]


def run_pipeline(models: RagModels, corpus: dict, qa: Sequence[dict], s: Settings, dev,
                 progress: Optional[bool] = None) -> tuple:
    """Retrieve -> rerank -> generate for every question -> (records in QA order, times {stage: seconds}).
    A record: id, question, answers, prediction, em, f1, hit, retrieval_hit, context (the top k_context
    reranked ids, in order), retrieved (the dense top k_context), reranked (documents reranked), generated (the
    raw text), prompt, prompt_tokens, new_tokens (the stop token included)."""
    um = models.retriever
    timed, times = stage_timer(um, dev)

    questions = {ex["id"]: ex["question"] for ex in qa}
    first = retrieve_stage(um, corpus, questions, s, timed, progress)
    second = timed("rerank_s", lambda: rerank(models.reranker, questions, corpus, first, s.k_rerank,
                                              max(1, s.batch_size // 2), progress))
    n_passage = s.max_passage_len or um.cfg.data.max_doc_len
    context = {q: rank_documents(second[q])[:s.k_context] for q in questions}
    prompts = [build_prompt(ex["question"], [truncate(models.gen_tok, corpus[d], n_passage)
                                             for d in context[ex["id"]]]) for ex in qa]
    generated, n_new, n_prompt = generate_stage(models.generator, models.gen_tok, prompts, s, timed, dev)
    records = []
    for ex, prompt, text, new, n_p in zip(qa, prompts, generated, n_new, n_prompt):
        q = ex["id"]
        retrieved = rank_documents(first[q])[:s.k_context]
        pred = answer_text(text)
        records.append({"id": q, "question": ex["question"], "answers": ex["answers"], "prediction": pred,
                        **score_example(pred, ex["answers"], [corpus[d] for d in context[q]],
                                        [corpus[d] for d in retrieved]),
                        "context": context[q], "retrieved": retrieved, "reranked": min(s.k_rerank, len(first[q])),
                        "generated": text, "prompt": prompt,
                        "prompt_tokens": n_p, "new_tokens": new})
    return records, times


# --------------------------------------------------------------------------------------------- the evaluation
def check_settings(s: Settings) -> None:
    """One EvalError naming the first bad setting: positive integers, k_context <= k_rerank <= k_retrieve."""
    for name in ("k_retrieve", "k_rerank", "k_context", "max_new_tokens", "batch_size", "gen_batch_size"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EvalError(f"{name} must be a positive integer, got {v!r}")
    if s.max_passage_len is not None and (not isinstance(s.max_passage_len, int) or s.max_passage_len < 1):
        raise EvalError(f"max_passage_len must be a positive integer, got {s.max_passage_len!r}")
    if not s.k_context <= s.k_rerank <= s.k_retrieve:
        raise EvalError(f"need k_context <= k_rerank <= k_retrieve, got {s.k_context}, {s.k_rerank}, "
                        f"{s.k_retrieve}")


def check_gen_routing(gen: CausalLM, routing) -> None:
    """The generation routing against the generator, before anything runs: experts to route, known names."""
    if routing is None:
        return
    if getattr(gen, "moe_lora_config", None) is None:
        raise EvalError(f"--gen-routing {routing!r}: the generator carries no experts (use 'none')")
    try:
        moe_lora.fixed_weights(moe_lora.get_config(gen), routing)
    except ValueError as e:
        raise EvalError(f"--gen-routing {routing!r}: {e}") from None


def load_inputs(data_dir: str, qa_path: str, max_questions: Optional[int]) -> tuple:
    """(corpus {doc_id: text}, QA examples): the QA file first (data.load_qa), so a bad one fails before a model
    loads; a missing one names the synthetic task's writer when data_dir is one."""
    if not os.path.isfile(qa_path):
        hint = (f" (write the synthetic task's with: python synthetic.py {data_dir} --qa)"
                if os.path.isfile(os.path.join(data_dir, "lexicon.json")) else "")
        raise data.DataError(f"{qa_path}: QA file not found{hint}")
    qa = data.load_qa(qa_path)[:max_questions] if max_questions else data.load_qa(qa_path)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: data directory not found")
    corpus = {k: data.doc_text(v) for k, v in data.load_corpus(data_dir).items()}
    return corpus, qa


def rag_costs(models: RagModels, records: list, times: dict, n_docs: int, dev, s: Settings) -> dict:
    """metrics.json's "costs": seconds per question per stage, peak memory, parameter bytes."""
    n = len(records)
    latency = {"retrieval_s_per_query": times["retrieval_s"] / n, "rerank_s_per_query": times["rerank_s"] / n,
               "generation_s_per_query": times["generation_s"] / n,
               "corpus_encode_s": times["corpus_encode_s"], "index_build_s": times["index_build_s"],
               "corpus_docs": n_docs, "rerank_pairs_per_query": sum(r["reranked"] for r in records) / n,
               "prompt_tokens_per_query": sum(r["prompt_tokens"] for r in records) / n,
               "new_tokens_per_query": sum(r["new_tokens"] for r in records) / n}
    latency["total_s_per_query"] = sum(latency[k] for k in ("retrieval_s_per_query", "rerank_s_per_query",
                                                            "generation_s_per_query"))
    um = models.retriever
    bases = {id(models.retriever.base), id(models.reranker.base), id(models.generator)}
    params = {"held_bytes": held_param_bytes(models), "bases_held": len(bases), "retriever": param_costs(um)}
    if models.reranker is not um:
        params["reranker"] = param_costs(models.reranker)
    if models.generator is not um.base:
        params["generator_bytes"] = sum(p.numel() * p.element_size() for p in models.generator.parameters())
    return {"latency": latency, **peak_memory(dev), "params": params, "device": str(dev),
            "batch_size": s.batch_size, "rerank_batch_size": max(1, s.batch_size // 2),
            "gen_batch_size": s.gen_batch_size, "torch_threads": torch.get_num_threads()}


def rag_provenance(models: RagModels, data_dir: str, qa_path: str, s: Settings, dev, max_questions) -> dict:
    """metrics.json's "provenance": which models, read how, on which data, with which settings and code."""
    commit, dirty = git_commit()
    return {"models": models.infos, **model_settings(models.retriever), "data_dir": os.path.abspath(data_dir),
            "qa_file": os.path.abspath(qa_path), "qa_sha256": sha256_file(qa_path), "max_questions": max_questions,
            "k_retrieve": s.k_retrieve, "k_rerank": s.k_rerank, "k_context": s.k_context,
            "max_new_tokens": s.max_new_tokens,
            "max_passage_len": s.max_passage_len or models.retriever.cfg.data.max_doc_len,
            "gen_routing": "none (adapters off)" if s.routing is None else s.routing, "decoding": "greedy",
            "prompt_template": PROMPT, "passage_template": PASSAGE, "index": "flat", "device": str(dev),
            "git_commit": commit, "git_dirty": dirty, "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": None}


def write_rag(out_dir: str, records: list, metrics: dict) -> None:
    """predictions.jsonl, then metrics.json (last: its presence means complete), each atomically; an older
    metrics.json is removed first."""
    os.makedirs(out_dir, exist_ok=True)
    old = os.path.join(out_dir, "metrics.json")
    if os.path.exists(old):
        os.remove(old)
    write_text_atomic(os.path.join(out_dir, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    write_text_atomic(old, json.dumps(metrics, indent=2) + "\n")
    _log(f"wrote {out_dir}")


def rag_checkpoint(ckpt, data_dir, qa_path, *, settings: Settings = Settings(), reranker=None, generator=None,
                   device="cpu", max_questions=None, max_doc_len=None, out_dir=None, write=True, overrides=(),
                   progress=None, models: Optional[RagModels] = None) -> dict:
    """The whole RAG evaluation of ckpt on data_dir's corpus and the QA file -> the metrics.json dict plus
    "predictions" (the records). `models` (load_models' result) skips loading. Written to out_dir (default
    <ckpt>/rag/<basename of data_dir>) when `write`."""
    t_start = time.time()
    check_settings(settings)
    ckpt, data_dir, qa_path = os.fspath(ckpt), os.fspath(data_dir), os.fspath(qa_path)
    if device not in ("cpu", "cuda", "auto"):
        raise EvalError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EvalError("rag.py runs in one process (no torchrun)")
    corpus, qa = load_inputs(data_dir, qa_path, max_questions)
    _, _, dev, _ = setup_distributed(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if models is None:
        models = load_models(ckpt, reranker, generator, dev, max_doc_len, overrides)
    check_gen_routing(models.generator, settings.routing)
    dataset = os.path.basename(os.path.normpath(data_dir))
    _log(f"{ckpt} on {dataset}: {len(qa)} questions, {len(corpus)} documents, k_retrieve {settings.k_retrieve}, "
         f"k_rerank {settings.k_rerank}, k_context {settings.k_context}, {len(models.infos)} model(s), {dev}")
    records, times = run_pipeline(models, corpus, qa, settings, dev, progress)
    metrics = {"checkpoint": os.path.abspath(ckpt), "dataset": dataset, "num_questions": len(records),
               **aggregate(records, settings.k_context),
               "costs": rag_costs(models, records, times, len(corpus), dev, settings),
               "provenance": rag_provenance(models, data_dir, qa_path, settings, dev, max_questions)}
    metrics["provenance"]["wall_s"] = time.time() - t_start
    if write:
        write_rag(out_dir or os.path.join(ckpt, "rag", dataset), records, metrics)
    return {**metrics, "predictions": records}


# --------------------------------------------------------------------------------------------- CLI
def summary(result: dict) -> dict:
    """The one line printed on stdout: the QA figures and the per-question latency."""
    keys = [k for k in result if k in ("em", "f1") or "answer_recall@" in k]
    lat = result["costs"]["latency"]
    return {"checkpoint": result["checkpoint"], "dataset": result["dataset"],
            "num_questions": result["num_questions"], **{k: result[k] for k in keys},
            **{k: lat[k] for k in ("retrieval_s_per_query", "rerank_s_per_query", "generation_s_per_query")},
            "peak_memory_bytes": result["costs"]["peak_memory_bytes"],
            "held_param_bytes": result["costs"]["params"]["held_bytes"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="rag.py", description="Retrieve -> rerank -> generate from one base, scored on a QA "
                       "file (EM, F1, answer recall, per-stage latency, peak memory).",
                       epilog=__doc__.split("Usage\n-----\n", 1)[1].split("\n\n", 1)[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="run directory, checkpoint directory or plain HF model directory")
    p.add_argument("--data", required=True, help="BEIR folder whose corpus.jsonl is searched")
    p.add_argument("--qa", required=True, help="QA file: one {\"id\", \"question\", \"answers\": [...]} per line")
    d = Settings()
    p.add_argument("--k-retrieve", type=int, default=d.k_retrieve, help="documents retrieved per question")
    p.add_argument("--k-rerank", type=int, default=d.k_rerank, help="top retrieved documents reranked")
    p.add_argument("--k-context", type=int, default=d.k_context, help="top reranked documents in the prompt")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-passage-len", type=int, help="tokens per passage in the prompt (default: data.max_doc_len)")
    p.add_argument("--gen-routing", default="none", help="the generator's experts: none (adapters off), a task "
                   "name (embed, rerank) or name=weight,... (moe_lora.fixed_routing)")
    p.add_argument("--reranker", help="a second run / checkpoint / model directory for reranking")
    p.add_argument("--generator", help="a run / checkpoint / model directory whose base generates")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="texts per encoding batch; reranking "
                   "uses half")
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size, help="prompts per generation batch")
    p.add_argument("--max-questions", type=int, help="the first N questions of the QA file")
    p.add_argument("--max-doc-len", type=int, help="document tokens for retrieval and reranking (as evaluate.py)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--out", help="output directory (default <ckpt>/rag/<dataset>)")
    p.add_argument("--no-write", action="store_true", help="print the summary only")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a]
    if len(overrides) != len(rest):
        raise UsageError(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)} "
                         "(config overrides are --section.key=value)")
    settings = Settings(args.k_retrieve, args.k_rerank, args.k_context, args.max_new_tokens, args.max_passage_len,
                        parse_routing(args.gen_routing), args.batch_size, args.gen_batch_size)
    result = rag_checkpoint(args.ckpt, args.data, args.qa, settings=settings, reranker=args.reranker,
                            generator=args.generator, device=args.device, max_questions=args.max_questions,
                            max_doc_len=args.max_doc_len, out_dir=args.out, write=not args.no_write,
                            overrides=overrides)
    print(json.dumps(summary(result)), flush=True)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python rag.py ...` through the CLIs' one error path (model.run_cli)."""
    return run_cli("rag.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
