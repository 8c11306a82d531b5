"""Cost of the exact chunked search of hard-negative mining (`mm_embed_trl.mining.search_top_k`, CPU).

    PYTHONPATH=src python benchmarks/mining_search.py [--queries 1024] [--dim 768] [--k 64] [--sizes 65536 262144]

Against the plain search that holds every score at once (`torch.topk(queries @ corpus.T)`), on random unit vectors:
seconds per search (median of --repeats), the largest score/key buffer each holds, and how far the two agree: the
share of (query, rank) slots holding the same item, and the largest score difference (chunks of the matrix product
round differently from the whole product, so near-equal scores may swap places).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from mm_embed_trl.mining import search_top_k  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--corpus_chunk_size", type=int, default=8192)
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=-1)
    print(f"CPU threads: {torch.get_num_threads()}; {args.queries} queries, dim {args.dim}, k {args.k}, "
          f"corpus chunk {args.corpus_chunk_size}")
    print(f"{'corpus':>8} {'chunked s':>10} {'plain s':>8} {'ratio':>6} {'chunked buffer MiB':>19} "
          f"{'plain buffer MiB':>17} {'same slot':>9} {'max |Δscore|':>12}")
    for size in args.sizes:
        corpus = torch.nn.functional.normalize(torch.randn(size, args.dim, generator=g), dim=-1).numpy()

        def chunked(corpus=corpus):
            return search_top_k(queries, corpus, args.k, corpus_chunk_size=args.corpus_chunk_size)

        def plain(corpus=corpus):
            return torch.topk(queries @ torch.from_numpy(corpus).T, args.k, dim=1)

        found, reference = chunked(), plain()
        same = (found.indices == reference.indices).float().mean().item()
        score_gap = (found.scores - reference.values).abs().max().item()
        chunked_s, plain_s = _median_seconds(chunked, args.repeats), _median_seconds(plain, args.repeats)
        chunked_mib = 8 * args.queries * (args.k + args.corpus_chunk_size) / 2**20  # int64 keys: top-k + one chunk
        plain_mib = 4 * args.queries * size / 2**20  # float32 scores of the whole corpus
        print(f"{size:>8} {chunked_s:>10.2f} {plain_s:>8.2f} {chunked_s / plain_s:>6.2f} {chunked_mib:>19.0f} "
              f"{plain_mib:>17.0f} {same:>9.4f} {score_gap:>12.1e}")


if __name__ == "__main__":
    main()
