"""Hard-negative mining for multimodal (query, positive) rows: embed, search (exact and chunked, or faiss), drop
duplicates of the positive, ranks outside a window and likely false negatives (UniME's margin rule), write the
negatives in the MMEB-train schema (or UME-R1's JSON). Resumable in chunks, shared out over ranks.

API: :func:`mine_hard_negatives`; command line: ``python -m mm_embed_trl.mining --help``.
"""

from .embedders import content_key, load_embedder
from .miner import MiningConfig, MiningSummary, mine_hard_negatives, to_ume_r1_records, write_mined
from .search import SearchResult, faiss_available, search_top_k

__all__ = [
    "MiningConfig",
    "MiningSummary",
    "SearchResult",
    "content_key",
    "faiss_available",
    "load_embedder",
    "mine_hard_negatives",
    "search_top_k",
    "to_ume_r1_records",
    "write_mined",
]
