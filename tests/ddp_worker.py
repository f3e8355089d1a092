"""One rank of test_ddp.py's cross-device InfoNCE check (a script run by torchrun, not a test module).

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py CONFIG.yaml OUT_DIR

CONFIG names a ready base (model.path). Every rank builds the same UniMoER (build_model seeds the expert init;
lora_B is then randomised from a fixed seed so every expert and router gets a gradient), wraps it in DDP, embeds
ITS slice of the fixed global batch (tiny_setup.fixed_batch: rank r takes queries [r*b, (r+1)*b) and their
b*g documents), computes info_nce_loss(cross_device=True) and backpropagates once. Each rank writes
OUT_DIR/rank<r>.pt = {"loss": the global loss (the returned value / world_size, as total_loss logs it),
"grads": {parameter name: gradient after DDP's average}}.

Then, with the same DDP model, one whole training step (train.forward_backward: InfoNCE, the rerank loss and the
router aux losses as the config sets them, train.aux_scope included) on rank r's slice of examples [0, 4) of the
training file, in 1 chunk and in 2 GradCache chunks: OUT_DIR/rank<r>.<chunks>chunk.pt = {"logs", "grads"}.
"""
import os
import sys

import torch
import torch.distributed as dist

import config
import losses
import tiny_setup  # puts the repository root on sys.path
import train
import unimoer

GLOBAL_QUERIES = 4


def main(cfg_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config.load_config(cfg_path)
    um = unimoer.build_model(cfg, torch.device("cpu"))
    tiny_setup.randomize_lora_B(um, seed=1)
    model = torch.nn.parallel.DistributedDataParallel(um, find_unused_parameters=True)

    g = 1 + cfg.data.n_neg
    queries, docs = tiny_setup.fixed_batch(cfg.data.dir, GLOBAL_QUERIES, cfg.data.n_neg)
    b = GLOBAL_QUERIES // world
    queries, docs = queries[rank * b:(rank + 1) * b], docs[rank * b * g:(rank + 1) * b * g]
    out = model(queries=um.tokens_queries(queries), docs=um.tokens_documents(docs))
    loss = losses.info_nce_loss(out["q"], out["d"], cfg.train.temperature, cross_device=True)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for n, p in um.named_parameters() if p.requires_grad}
    torch.save({"loss": loss.item() / world, "grads": grads, "world": world},
               os.path.join(out_dir, f"rank{rank}.pt"))

    for chunks in (1, 2):
        um.zero_grad(set_to_none=True)
        inputs = tiny_setup.step_chunks(um, cfg.data.dir, rank * b, b, chunks)
        _, logs = train.forward_backward(model, um, inputs, cfg, g)
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                 for n, p in um.named_parameters() if p.requires_grad}
        torch.save({"logs": logs, "grads": grads}, os.path.join(out_dir, f"rank{rank}.{chunks}chunk.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
