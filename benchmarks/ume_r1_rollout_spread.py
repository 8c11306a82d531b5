"""Do a prompt's sampled reasonings differ in retrieval quality? (the signal GRPO's group-relative advantage needs)

    PYTHONPATH=src python benchmarks/ume_r1_rollout_spread.py MODEL_DIR [--rows 48] [--samples 8]

Held-out generated rows: each target embedded once (greedy generative), each query sampled k times (temperature 1);
the reciprocal rank of each sample's target, its spread within a query's k samples against the spread of the
queries' means, and best-of-k against single-sample recall@1.
"""
import argparse
from pathlib import Path

import torch

from mm_embed_trl import MultimodalEmbeddingModel
from mm_embed_trl.demo.generated import make_shapes_dataset
from mm_embed_trl.scripts import EmbeddingScriptArguments

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--rows", type=int, default=48)
p.add_argument("--samples", type=int, default=8)
args = p.parse_args()
n, k = args.rows, args.samples
a = EmbeddingScriptArguments()
ds = make_shapes_dataset(num_train=1024, num_eval=96, seed=a.seed_data, num_negatives=a.generated_num_negatives)
ev = ds["eval"].select(range(n))
root = Path(ds.image_root)
m = MultimodalEmbeddingModel.from_pretrained(args.model, encoder_kind="generative")
def inp(text, img):
    return (str(root / img), text) if img and text else (str(root / img) if img else text)
q = [inp(r["qry"], r["qry_image_path"]) for r in ev]
d = [inp(r["pos_text"], r["pos_image_path"]) for r in ev]
torch.manual_seed(0)
docs = m.encode(d, side="document", mode="generative", max_new_tokens=48, batch_size=16)
qs = m.encode(q, side="query", mode="generative", max_new_tokens=48, do_sample=True, num_samples=k, batch_size=8)
S = torch.einsum("nkd,md->nkm", qs, docs)  # (n, k, n)
pos = S[torch.arange(n), :, torch.arange(n)]  # (n, k)
rank = (S > pos[..., None]).sum(-1) + 1
rr = 1.0 / rank.float()
print("mean RR", rr.mean().item(), "within-group std", rr.std(1).mean().item(),
      "between-group std of means", rr.mean(1).std().item())
print("groups with any spread", (rr.std(1) > 1e-6).float().mean().item())
print(f"best-of-{k} R@1", (rank.min(1).values == 1).float().mean().item(),
      "mean-sample R@1", (rank == 1).float().mean().item())
