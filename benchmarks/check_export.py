"""Round trip of export.py on real data: an exported embedding directory read by sentence-transformers and an
exported reranker read by transformers' AutoModelForCausalLM with reranker_template.json, against the unmerged run
(UniMoER.encode_queries / encode_documents / score_pairs). Prints the largest absolute differences.

    python export.py RUN EMBED_DIR --task embed && python export.py RUN RERANK_DIR --task rerank
    python benchmarks/check_export.py RUN EMBED_DIR RERANK_DIR DATA_DIR [--n 100]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from sentence_transformers import SentenceTransformer  # test-only dependencies (requirements-dev.txt)
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import unimoer  # noqa: E402


def template_scores(path, queries, docs, batch=25):
    t = json.load(open(os.path.join(path, "reranker_template.json")))
    tok, lm = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    room = t["max_length"] - len(t["prefix_ids"]) - len(t["suffix_ids"])
    seqs = [t["prefix_ids"] + tok(t["pair_format"].format(instruction=t["instruction"], query=q, document=d),
                                  add_special_tokens=False)["input_ids"][:room] + t["suffix_ids"]
            for q, d in zip(queries, docs)]
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            b = tok.pad({"input_ids": seqs[i:i + batch]}, padding=True, return_tensors="pt")  # left padding
            logits = lm(**b).logits[:, -1]  # (b, V)
            out.append((logits[:, t["yes_id"]] - logits[:, t["no_id"]]).numpy())
    return np.concatenate(out)


def main():
    p = argparse.ArgumentParser()
    for a in ("run", "embed", "rerank", "data"):
        p.add_argument(a)
    p.add_argument("--n", type=int, default=100, help="queries and pairs; 2n documents")
    a = p.parse_args()
    um = unimoer.load_run(a.run)
    qs = list(data.load_queries(a.data).values())[:a.n]
    docs = [data.doc_text(d) for d in list(data.load_corpus(a.data).values())[:2 * a.n]]
    st = SentenceTransformer(a.embed, device="cpu", local_files_only=True)
    dq = np.abs(st.encode(qs, prompt_name="query", batch_size=32) - um.encode_queries(qs)).max()
    dd = np.abs(st.encode(docs, batch_size=32) - um.encode_documents(docs)).max()
    ds = np.abs(template_scores(a.rerank, qs, docs[:len(qs)]) - um.score_pairs(qs, docs[:len(qs)])).max()
    print(f"queries {len(qs)}: max |dq| {dq:.2e}; documents {len(docs)}: max |dd| {dd:.2e}; "
          f"pairs {len(qs)}: max |dscore| {ds:.2e}")


if __name__ == "__main__":
    main()
