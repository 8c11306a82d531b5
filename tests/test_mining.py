"""Hard-negative mining (`mm_embed_trl.mining`): the search against a brute-force reference, the drop rules on hand-made
cases, planted duplicates of the positive, resumption from chunks, the output schemas, and a sentence-transformers
model; the CLI on 2 ranks equals 1 process and its output trains through `examples/train_hardneg.py` (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import launching
import numpy as np
import pytest
import torch
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from mm_embed_trl.mining import MiningConfig, content_key, mine_hard_negatives, search_top_k
from mm_embed_trl.mining.miner import REASONS, filter_candidates

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------- search
def _reference_top_k(queries, corpus, k, query_groups=None, corpus_groups=None):
    """Every score in float64, sorted per query by (score descending, index ascending)."""
    scores = queries.double() @ corpus.double().T
    if query_groups is not None:
        scores[torch.as_tensor(query_groups)[:, None] != torch.as_tensor(corpus_groups)[None, :]] = -torch.inf
    order = [np.lexsort((np.arange(scores.shape[1]), -row.numpy()))[:k] for row in scores]
    indices = torch.as_tensor(np.stack(order))
    return torch.gather(scores, 1, indices), indices


@pytest.mark.parametrize("corpus_chunk_size", [7, 64, 1000])
def test_exact_search_equals_brute_force(corpus_chunk_size):
    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(33, 24, generator=g), dim=-1)
    corpus = torch.nn.functional.normalize(torch.randn(301, 24, generator=g), dim=-1)
    query_groups, corpus_groups = torch.randint(0, 3, (33,), generator=g), torch.randint(0, 3, (301,), generator=g)
    for groups in (None, (query_groups, corpus_groups)):
        found = search_top_k(queries, corpus.numpy(), 20, corpus_chunk_size=corpus_chunk_size,
                             query_groups=None if groups is None else groups[0],
                             corpus_groups=None if groups is None else groups[1])
        ref_scores, ref_indices = _reference_top_k(queries, corpus, 20, *(groups or ()))
        # float32 dot products of 24 terms against float64 ones: rounding only
        tolerance = rounding_rtol(terms=24)
        assert_close(found.scores.double(), ref_scores, rtol=tolerance)
        differ = found.indices != ref_indices
        # a different item at a rank is only allowed where the reference scores tie within rounding
        swapped_scores = (queries.double() @ corpus.double().T).gather(1, found.indices.clamp(min=0))
        assert torch.all((swapped_scores - ref_scores).abs()[differ] <= 2 * tolerance)
        assert differ.float().mean() < 0.01


def test_exact_search_breaks_ties_by_the_lower_index_across_chunks():
    # small integers: every dot product is exact, so the ties below are real ties
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    found = search_top_k(queries, corpus, 4, corpus_chunk_size=2)
    assert found.indices.tolist() == [[0, 2, 3, 5], [1, 4, 0, 2]]
    assert found.scores.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # ties across the cut inside a chunk wider than k (the float top-k's own choice among them is overruled)
    shuffle = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    corpus = torch.tensor([[0.5, 0.0]] * 40 + [[1.0, 0.0]] * 40 + [[0.0, 1.0]] * 40)[shuffle]
    for chunk in (50, 120):
        found = search_top_k(queries, corpus, 3, corpus_chunk_size=chunk)
        for query, row in zip(queries, found.indices.tolist()):
            best = torch.nonzero(corpus @ query == 1.0)[:, 0]
            assert row == best[:3].tolist()


class _LargestBuffer(TorchDispatchMode):
    """The largest tensor storage any torch operation produces while active (scores, keys, their concatenation)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.nbytes = max(self.nbytes, leaf.untyped_storage().nbytes())
        return out


def test_exact_search_memory_is_bounded_by_the_chunk_not_the_corpus():
    g = torch.Generator().manual_seed(0)
    num_queries, corpus_size, k, chunk = 16, 5000, 5, 100
    queries = torch.nn.functional.normalize(torch.randn(num_queries, 8, generator=g), dim=-1)
    corpus = torch.nn.functional.normalize(torch.randn(corpus_size, 8, generator=g), dim=-1).numpy()  # as a memmap
    with _LargestBuffer() as chunked:
        found = search_top_k(queries, corpus, k, corpus_chunk_size=chunk)
    # the running top-k beside one chunk's scores, as int64 keys: the largest buffer the search may hold
    bound = num_queries * (k + chunk) * 8
    assert num_queries * chunk * 4 <= chunked.nbytes <= bound
    with _LargestBuffer() as whole:  # the meter sees a whole-corpus score matrix when the chunk is the corpus
        unchunked = search_top_k(queries, corpus, k, corpus_chunk_size=corpus_size)
    assert whole.nbytes >= num_queries * corpus_size * 4 > 10 * bound
    assert torch.equal(found.indices, unchunked.indices) and torch.equal(found.scores, unchunked.scores)


class _FlatIPStandIn:
    """faiss.IndexFlatIP by brute force, breaking ties by the higher index (faiss's tie order is its own)."""

    def __init__(self, dim):
        self.items = np.zeros((0, dim), dtype=np.float32)

    def add(self, items):
        self.items = np.concatenate([self.items, items])

    def search(self, queries, k):
        scores = queries @ self.items.T
        order = np.stack([np.lexsort((-np.arange(len(self.items)), -row))[:k] for row in scores])
        return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("grouped", [False, True])
def test_faiss_backend_equals_the_exact_search(grouped, monkeypatch):
    import importlib.util
    import sys
    import types

    stand_in = importlib.util.find_spec("faiss") is None
    if stand_in:  # the real faiss where installed, else a brute-force stand-in
        monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=_FlatIPStandIn))
    g = torch.Generator().manual_seed(1)
    # small integers: exact dot products with many real ties, which both backends must order alike
    corpus = torch.randint(-2, 3, (60, 4), generator=g).float()
    queries = torch.randint(-2, 3, (9, 4), generator=g).float()
    groups = dict(query_groups=torch.randint(0, 3, (9,), generator=g).numpy(),
                  corpus_groups=torch.randint(0, 3, (60,), generator=g).numpy()) if grouped else {}
    exact = search_top_k(queries, corpus.numpy(), 12, corpus_chunk_size=7, **groups)
    found = search_top_k(queries, corpus.numpy(), 12, backend="faiss", **groups)
    assert torch.equal(found.scores, exact.scores)
    # ties are ordered by index in both; only which of the items tied at the last rank's score make the cut is
    # faiss's own choice
    inside = found.scores > found.scores[:, -1:]
    assert torch.equal(found.indices[inside], exact.indices[inside])
    assert not stand_in or (found.indices != exact.indices).any(), "no tie at the cut: the case is too easy"


def test_search_with_fewer_allowed_candidates_than_k_pads_with_minus_one():
    corpus = torch.eye(4)
    found = search_top_k(torch.eye(4)[:1], corpus, 3, query_groups=[0], corpus_groups=[0, 1, 0, 1])
    assert found.indices.tolist() == [[0, 2, -1]]
    assert found.scores[0, 2] == -torch.inf


# ------------------------------------------------------------------------------------------------- drop rules
def test_filter_candidates_on_a_hand_made_case():
    from mm_embed_trl.mining.miner import _pair_hash

    # two rows (search units 0 and 1) whose positives are pool items 0 and 2; item 3 is a copy of item 0 (same
    # content key), item 4 a copy of item 6
    pool_keys = np.arange(10, dtype=np.int64) + 100
    pool_keys[3], pool_keys[4] = pool_keys[0], pool_keys[6]
    units = np.array([0, 1])
    excluded = np.unique(_pair_hash(units, pool_keys[[0, 2]]))
    indices = np.array([[0, 3, 5, 6, 4, 7, 8, 9, 2],
                        [5, 2, 6, 4, 7, 9, 8, 1, 0]])
    scores = np.array([[0.95, 0.95, 0.93, 0.88, 0.88, 0.70, 0.60, 0.50, 0.40],
                       [0.97, 0.90, 0.86, 0.86, 0.79, 0.72, 0.65, 0.30, 0.20]], dtype=np.float32)
    positive_scores = np.array([0.80, 0.70], dtype=np.float32)
    config = MiningConfig(num_negatives=2, false_negative_margin=0.1, range_min=1, range_max=5, depth=8)
    out = filter_candidates(indices, scores, positive_scores, units, pool_keys, excluded, config)
    # row 0: 0 and 3 are its positive; 4 repeats 6. Ranks of the rest: 5 (0), 6 (1), 7 (2), 8 (3), 9 (4), 2 (5);
    # the window [1, 5) drops 5 and 2; the margin keeps scores <= 0.80 + 0.1: all of 6, 7, 8, 9 -> the 2 best 6, 7.
    # row 1: 2 is its positive (item 0 is not: another row's positive, of another query); 4 repeats 6. Ranks: 5 (0),
    # 6 (1), 7 (2), 9 (3), 8 (4), 1 (5), 0 (6); the window drops 5, 1, 0; the margin (<= 0.80) drops 6 (0.86).
    assert out["negatives"].tolist() == [[6, 7], [7, 9]]
    assert out["survivors"].tolist() == [4, 3]
    assert_close(torch.as_tensor(out["negative_scores"]), torch.tensor([[0.88, 0.70], [0.79, 0.72]]), rtol=1e-7)
    dropped = dict(zip(REASONS, out["dropped"].tolist()))
    assert dropped == {"positive_or_duplicate": 3, "repeated_candidate": 2, "outside_rank_window": 5,
                       "above_margin": 1}
    assert out["candidates"].tolist() == [18]  # every retrieved item within depth 8 of the distinct candidates
    # UniME's defaults: margin 0.1, the whole window (depth 4 x 3 = 12 covers every candidate)
    config = MiningConfig(num_negatives=3, false_negative_margin=0.1)
    out = filter_candidates(indices[:1], scores[:1], np.array([0.80], np.float32), units[:1], pool_keys, excluded,
                            config)
    assert out["negatives"].tolist() == [[6, 7, 8]]  # 5 (0.93 > 0.80 + 0.1) is a likely false negative
    assert dict(zip(REASONS, out["dropped"].tolist()))["above_margin"] == 1
    # no margin rule: the best distinct non-positives in rank order
    config = MiningConfig(num_negatives=3, false_negative_margin=None)
    out = filter_candidates(indices[:1], scores[:1], np.array([0.80], np.float32), units[:1], pool_keys, excluded,
                            config)
    assert out["negatives"].tolist() == [[5, 6, 7]]


def test_mining_config_refuses_bad_options():
    with pytest.raises(ValueError, match="rank window"):
        MiningConfig(range_min=5, range_max=5)
    with pytest.raises(ValueError, match="short_rows"):
        MiningConfig(short_rows="pad")
    with pytest.raises(ValueError, match="num_negatives"):
        MiningConfig(num_negatives=0)


@pytest.mark.parametrize(("output", "output_format", "message"), [
    ("mined.json", "mmeb", "output_format='ume_r1'"),
    ("mined.jsonl", "ume_r1", r"name the output '\*\.json'"),
    ("mined.csv", "mmeb", "jsonl, .parquet or a folder"),
])
def test_an_output_name_that_does_not_fit_its_format_is_refused_before_any_work(output, output_format, message,
                                                                                 tmp_path):
    from datasets import Dataset

    rows = Dataset.from_dict({"qry": ["a"], "pos_text": ["b"]})
    with pytest.raises(ValueError, match=message):  # no model is needed to get there
        mine_hard_negatives(rows, None, output=tmp_path / output, output_format=output_format)
    assert not list(tmp_path.iterdir())


def test_a_rank_waiting_for_chunks_that_never_come_stops_naming_them(tmp_path, monkeypatch):
    from mm_embed_trl.mining.miner import _Ranks

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = _Ranks(timeout=0.2)
    (tmp_path / "chunk-000000.npz").touch()  # rank 0's; rank 1's never comes
    with pytest.raises(TimeoutError, match=r"Rank 0 of 2 waited 0 s for 1 result chunk.*chunk-000001\.npz"):
        ranks.wait_for([tmp_path / "chunk-000000.npz", tmp_path / "chunk-000001.npz"], "result", poll_seconds=0.05)


def test_several_ranks_without_a_shared_folder_are_refused(monkeypatch):
    from datasets import Dataset

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 ranks share the work through files: pass output= or work_dir="):
        mine_hard_negatives(Dataset.from_dict({"qry": ["a"], "pos_text": ["b"]}), None)


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def planted(shapes_data, tmp_path_factory):
    """64 shapes rows with planted duplicates of positives: each t2i row's positive image copied under another
    name, each i2t row's caption in other case and spacing, as corpus items; and 4 rows whose query repeats another
    row's query with a different positive (both positives are then the query's)."""
    from datasets import Dataset

    root = Path(shapes_data.image_root)
    rows = shapes_data["train"].select(range(64)).remove_columns(["neg_text", "neg_image_path"])
    copies = tmp_path_factory.mktemp("copies")
    corpus = {"text": [], "image": []}
    for row in rows:
        if row["pos_image_path"]:
            copy = copies / ("copy-of-" + Path(row["pos_image_path"]).name)
            shutil.copy(root / row["pos_image_path"], copy)
            corpus["text"].append(row["pos_text"])
            corpus["image"].append(str(copy))
        else:
            corpus["text"].append("  " + row["pos_text"].upper().replace(" ", "   ") + " ")
            corpus["image"].append("")
    extra = rows.select(range(4)).to_dict()
    extra["pos_text"] = [rows[i + 10]["pos_text"] for i in range(4)]
    extra["pos_image_path"] = [rows[i + 10]["pos_image_path"] for i in range(4)]
    from datasets import concatenate_datasets

    rows = concatenate_datasets([rows, Dataset.from_dict(extra, features=rows.features)])
    return rows, Dataset.from_dict(corpus), str(root)


def _content_of(text, image, root):
    from mm_embed_trl.data.images import load_image

    return content_key(text, load_image(image, root) if image else None)


def test_planted_duplicates_of_the_positive_are_never_mined(planted, qwen2_vl_model, tmp_path):
    rows, corpus, root = planted
    mined, summary = mine_hard_negatives(
        rows, qwen2_vl_model, corpus=corpus, image_root=root, work_dir=tmp_path / "work", num_workers=0,
        num_negatives=6, false_negative_margin=None, match_modality=False, chunk_size=16, depth=1000,
    )
    assert len(mined) == len(rows) and summary.rows_mined == len(rows)
    positives_of_query: dict[tuple, set] = {}
    for row in rows:
        key = (row["qry"], row["qry_image_path"])
        positives_of_query.setdefault(key, set()).add(_content_of(row["pos_text"], row["pos_image_path"], root))
    for row in mined:
        forbidden = positives_of_query[(row["qry"], row["qry_image_path"])]
        mined_keys = {_content_of(t, i, root) for t, i in zip(row["neg_text"], row["neg_image_path"])}
        assert not mined_keys & forbidden, row
        assert len(mined_keys) == 6, row  # the planted copies of other rows' positives never give one negative twice
    # the whole pool was retrieved (depth 1000): every positive, planted copy and other positive of the same query
    # was examined and dropped, row by row
    pool = {(r["pos_text"], r["pos_image_path"]) for r in rows} | set(zip(corpus["text"], corpus["image"]))
    pool_keys = [_content_of(t, i, root) for t, i in pool]
    expected = sum(sum(k in positives_of_query[(r["qry"], r["qry_image_path"])] for k in pool_keys) for r in rows)
    assert summary.dropped["positive_or_duplicate"] == expected > 2 * len(rows)
    assert summary.dropped["repeated_candidate"] > 0


def _text_rows(qry, pos, **columns):
    from datasets import Dataset

    return Dataset.from_dict({"qry": qry, "qry_image_path": [""] * len(qry), "pos_text": pos,
                              "pos_image_path": [""] * len(pos), **columns})


def _canonical(text: str) -> str:
    return " ".join(text.split()).casefold()


def test_a_query_is_never_its_own_negative_and_one_query_content_is_one_query(qwen2_vl_model, tmp_path):
    """Symmetric pairs (x -> y, y -> x) hold every query among the candidates: without the rule a query could be
    mined as its own negative. Queries that differ only in case and spacing are one query: neither row's positive is
    the other's negative. No margin here, so nothing else stops either."""
    texts = ["a red square", "a blue circle", "a green triangle", "a yellow star", "a purple hexagon", "an orange oval"]
    rows = _text_rows(texts + ["A dog runs", "a  dog   RUNS"], texts[1:] + texts[:1] + ["a puppy", "a hound"])
    mined, summary = mine_hard_negatives(rows, qwen2_vl_model, work_dir=tmp_path / "w", num_negatives=6,
                                         false_negative_margin=None, match_modality=False, depth=1000)
    assert summary.rows_mined == len(rows)
    for row in mined:
        negatives = {_canonical(t) for t in row["neg_text"]}
        assert _canonical(row["qry"]) not in negatives and _canonical(row["pos_text"]) not in negatives, row
        if "dog" in row["qry"]:
            assert not negatives & {"a puppy", "a hound"}, row  # the positives of its query, in either row
        else:
            assert len(negatives) == 6, row  # the 8 candidates less its positive and its own text
    # every row examined the whole pool: its positive(s) and its query dropped
    assert summary.dropped["positive_or_duplicate"] == 6 * 2 + 2 * 2


def test_rows_are_named_by_their_number_in_the_dataset_and_any_group_column_works(qwen2_vl_model, tmp_path):
    """A row check with on_bad_row="skip" leaves rows out; errors still name the user's row. A group column that is
    not text (an int source id) groups as its text."""
    import io

    from PIL import Image

    from mm_embed_trl.data.images import ImageLoadError

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(32, 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:1000])  # there, but its pixels do not decode
    rows = _text_rows(["", "a", "b"], ["p0", "p1", "p2"])
    rows = rows.remove_columns("pos_image_path").add_column("pos_image_path", ["", "", str(tmp_path / "truncated.png")])
    with pytest.raises(ImageLoadError, match="row 2, column 'pos_image_path'"):  # row 0 (empty query) was skipped
        mine_hard_negatives(rows, qwen2_vl_model, work_dir=tmp_path / "w1", num_negatives=1, on_bad_row="skip")
    rows = _text_rows(["a", "b", "c", "d"], ["p0", "p1", "p2", "p3"], source=[0, 1, 0, 1])
    mined, _ = mine_hard_negatives(rows, qwen2_vl_model, work_dir=tmp_path / "w2", num_negatives=1,
                                   group_column="source", match_modality=False, false_negative_margin=None)
    assert mined["neg_text"] == [["p2"], ["p3"], ["p0"], ["p1"]]  # the other row of its source


def test_a_rows_negatives_and_counts_do_not_depend_on_the_chunk_size():
    """A chunk of search units is retrieved as deep as its unit with the most excluded copies needs; each row keeps
    its own depth, so its negatives and the counts are the same whatever units share its chunk. Small-integer
    embeddings: every score is exact, ties go to the lower index."""
    import pyarrow as pa
    from datasets import Dataset

    from mm_embed_trl.mining.miner import MiningSummary, _RowTable, _Searcher

    rng = np.random.default_rng(0)
    n, extra = 40, 60
    table = pa.table({"qry": [f"q{i}" for i in range(n)], "qry_image_path": [""] * n,
                      "pos_text": [f"p{i}" for i in range(n)], "pos_image_path": [""] * n})
    corpus = Dataset.from_dict({"text": [f"c{i}" for i in range(extra)]})
    config = MiningConfig(num_negatives=3, depth=5, false_negative_margin=None, match_modality=False, chunk_size=n)
    rows = _RowTable(table, config, corpus)
    pool_keys = np.arange(n + extra, dtype=np.int64) + 1000
    pool_keys[n:n + 21] = pool_keys[np.arange(21) % 7]  # rows 0-6 have 3 copies of their positive in the corpus
    pool_keys[n + 21:n + 31] = pool_keys[n + 31:n + 41]  # copies of other candidates: repeats
    query_keys = np.arange(n, dtype=np.int64) + 5000
    query_keys[10:20] = pool_keys[11:21]  # symmetric rows: these queries are other rows' positives
    rows.set_search_units(query_keys)
    query_emb = rng.integers(-3, 4, (n, 8)).astype(np.float32)
    pool_emb = rng.integers(-3, 4, (n + extra, 8)).astype(np.float32)

    def mine(chunk_size):
        searcher = _Searcher(rows, MiningConfig(**{**config.__dict__, "chunk_size": chunk_size}), query_emb,
                             pool_emb, pool_keys)
        negatives, dropped, candidates = np.full((n, 3), -2), np.zeros(len(REASONS), dtype=np.int64), 0
        for c in range(searcher.num_chunks):
            out = searcher.chunk(c)
            negatives[out["rows"]] = out["negatives"]
            dropped += out["dropped"]
            candidates += int(out["candidates"][0])
        return searcher, negatives, dropped.tolist(), candidates

    whole, *expected = mine(n)
    assert len(set(whole.unit_excluded.tolist())) > 2  # chunks differ in how deep they retrieve
    assert (expected[0] >= 0).all() and expected[1][0] > 0 and expected[1][1] > 0
    for chunk_size in (7, 3, 1):
        _, negatives, dropped, candidates = mine(chunk_size)
        assert np.array_equal(negatives, expected[0]) and (dropped, candidates) == (expected[1], expected[2])
    # the summary's dropped-rows line counts the rows without a negative, not the short ones dropped with them
    summary = MiningSummary(rows=10, rows_short=2, rows_dropped=5, rows_mined=5, short_rows="drop")
    assert "  3 row(s) dropped (no negative left)" in summary.format()


def test_mined_negatives_are_the_brute_force_top_k_of_encode_with_video_queries(shapes_data, qwen2_vl_model,
                                                                                tmp_path):
    """The whole pipeline against a reference built from `encode` alone: every score of every row's query against
    every candidate of its positive's modality, its positive left out, UniME's margin applied, the best k kept.
    Four rows have a video query (a folder of frames) and a caption positive."""
    from datasets import Dataset, concatenate_datasets
    from PIL import Image

    root = Path(shapes_data.image_root)
    rows = shapes_data["train"].select(range(24)).remove_columns(["neg_text", "neg_image_path"])
    rows = rows.add_column("qry_video_path", [""] * len(rows))
    video_rows = {name: [] for name in rows.column_names}
    for i in range(4):  # a video of frames of four shapes images; positive: another caption
        folder = tmp_path / f"video_{i}"
        folder.mkdir()
        for j in range(4):
            source = rows[4 * i + j]
            Image.open(root / (source["pos_image_path"] or source["qry_image_path"])).save(folder / f"frame_{j}.png")
        extra = {"qry": "What happens in this clip?", "qry_image_path": "", "qry_video_path": str(folder),
                 "pos_text": f"clip number {i}", "pos_image_path": ""}
        for name in rows.column_names:
            video_rows[name].append(extra.get(name, rows[0][name]))
    rows = concatenate_datasets([rows, Dataset.from_dict(video_rows, features=rows.features)])
    k, margin = 3, 0.1
    mined, _ = mine_hard_negatives(rows, qwen2_vl_model, image_root=str(root), num_workers=1, num_negatives=k,
                                   false_negative_margin=margin, depth=200, chunk_size=8, batch_size=4,
                                   work_dir=tmp_path / "work")
    assert len(mined) == len(rows)

    def inputs(texts, images, videos=None):
        videos = videos or [""] * len(texts)
        return [{"text": t or None, "image": i or None, "video": v or None} for t, i, v in zip(texts, images, videos)]

    queries = qwen2_vl_model.encode(inputs(rows["qry"], rows["qry_image_path"], rows["qry_video_path"]),
                                    side="query", image_root=str(root), batch_size=7)
    pool = sorted(set(zip(rows["pos_text"], rows["pos_image_path"])))
    documents = qwen2_vl_model.encode(inputs([t for t, _ in pool], [i for _, i in pool]), side="document",
                                      image_root=str(root), batch_size=7)
    scores = (queries.double() @ documents.double().T).numpy()
    at = {item: j for j, item in enumerate(pool)}
    # float32 forwards in other batches than the reference's: scores differ by rounding in the model's depth
    tolerance = 4 * rounding_rtol(**TINY_IMAGE_FORWARD)
    for r, (row, out) in enumerate(zip(rows, mined)):
        positive = at[(row["pos_text"], row["pos_image_path"])]
        same_modality = np.array([bool(i) == bool(row["pos_image_path"]) for _, i in pool])
        allowed = same_modality & (np.arange(len(pool)) != positive)
        allowed &= scores[r] <= scores[r, positive] + margin + tolerance
        expected = np.sort(scores[r][allowed])[::-1][:k]
        got = [scores[r, at[(t, i)]] for t, i in zip(out["neg_text"], out["neg_image_path"])]
        assert np.allclose(got, expected, rtol=0, atol=tolerance), (r, got, expected)


def test_a_video_positive_is_refused_by_row(shapes_data, qwen2_vl_model, tmp_path):
    rows = shapes_data["train"].select(range(4)).remove_columns(["neg_text", "neg_image_path"])
    (tmp_path / "clip").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "clip" / "0001.png")  # a frame folder that is there
    rows = rows.add_column("pos_video_path", ["", "", str(tmp_path / "clip"), ""])
    with pytest.raises(ValueError, match=r"Row 2 \(and 0 more\) has a video positive"):
        mine_hard_negatives(rows, qwen2_vl_model, image_root=shapes_data.image_root, work_dir=tmp_path / "work")


def test_mining_writes_each_schema_and_the_output_passes_the_row_check(planted, qwen2_vl_model, tmp_path):
    from mm_embed_trl.data.loading import load_rows_dataset
    from mm_embed_trl.data.validation import check_training_rows

    rows, _, root = planted
    common = dict(image_root=root, num_workers=0, num_negatives=3, chunk_size=32, work_dir=tmp_path / "work",
                  keep_work_dir=True)
    mined, summary = mine_hard_negatives(rows, qwen2_vl_model, output=tmp_path / "mined.jsonl", **common)
    written = load_rows_dataset(str(tmp_path / "mined.jsonl"))
    assert written["neg_text"] == mined["neg_text"] and written["neg_image_path"] == mined["neg_image_path"]
    assert all(len(n) == 3 for n in written["neg_text"])
    check_training_rows(written, num_negatives=3, image_root=root)  # trains as it is (its images are there)
    saved = json.loads((tmp_path / "mined.mining.json").read_text())
    assert saved["rows_mined"] == summary.rows_mined and set(saved["dropped"]) == set(REASONS)
    # modalities match the positive's by default: captions for image queries, images for caption queries
    for row in written:
        assert all(bool(i) == bool(row["pos_image_path"]) for i in row["neg_image_path"])
    # UME-R1's JSON, read back by the UME-R1 loader: the same negatives; the embeddings were reused
    ume, _ = mine_hard_negatives(rows, qwen2_vl_model, output=tmp_path / "mined.json", output_format="ume_r1",
                                 **common)
    back = load_rows_dataset(str(tmp_path / "mined.json"))
    from mm_embed_trl.data.templates import strip_image_placeholders

    def bare(lists):  # UME-R1 writes its own <image> placeholder
        return [[strip_image_placeholders(t) for t in texts] for texts in lists]

    assert bare(back["neg_text"]) == bare(ume["neg_text"]) == bare(mined["neg_text"])
    assert back["neg_image_path"] == ume["neg_image_path"] == mined["neg_image_path"]
    assert len(list((tmp_path / "work").glob("embeddings-*"))) == 1


def test_a_killed_run_resumes_from_its_chunks(planted, qwen2_vl_model, tmp_path, monkeypatch):
    from mm_embed_trl.mining import embedders

    rows, corpus, root = planted
    common = dict(corpus=corpus, image_root=root, num_workers=0, num_negatives=4, chunk_size=16,
                  work_dir=tmp_path / "work")
    calls = []
    real_embed = embedders.Embedder.embed

    def dies_after_five_chunks(self, items, side, labels=None):
        calls.append(len(items))
        if len(calls) > 5:
            raise KeyboardInterrupt("killed")
        return real_embed(self, items, side, labels)

    monkeypatch.setattr(embedders.Embedder, "embed", dies_after_five_chunks)
    with pytest.raises(KeyboardInterrupt):
        mine_hard_negatives(rows, qwen2_vl_model, **common)
    monkeypatch.setattr(embedders.Embedder, "embed", lambda self, *a, **k: calls.append(1) or real_embed(self, *a,
                                                                                                         **k))
    calls.clear()
    resumed, _ = mine_hard_negatives(rows, qwen2_vl_model, **common)
    done_before = 5
    total_chunks = -(-len(rows) // 16) + -(-(2 * len(rows)) // 16)  # queries; positives + corpus (upper bound)
    assert len(calls) <= total_chunks - done_before
    fresh, _ = mine_hard_negatives(rows, qwen2_vl_model, **{**common, "work_dir": tmp_path / "fresh"})
    assert resumed["neg_text"] == fresh["neg_text"] and resumed["neg_image_path"] == fresh["neg_image_path"]


def test_another_model_never_reuses_the_embeddings_of_the_first(planted, qwen2_vl_model, tiny_backbone, tmp_path):
    from mm_embed_trl import MultimodalEmbeddingModel

    rows, _, root = planted
    common = dict(image_root=root, num_workers=0, num_negatives=2, chunk_size=64, work_dir=tmp_path / "work")
    first, _ = mine_hard_negatives(rows, qwen2_vl_model, **common)
    other = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    second, _ = mine_hard_negatives(rows, other, **common)
    folders = sorted((tmp_path / "work").glob("embeddings-*"))
    assert len(folders) == 2  # keyed by the weights' fingerprint
    assert json.loads((folders[0] / "identity.json").read_text())["checksum"] != json.loads(
        (folders[1] / "identity.json").read_text())["checksum"]


def test_a_sentence_transformers_export_embeds_as_the_model(planted, qwen2_vl_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    from mm_embed_trl.export import save_model_for_inference
    from mm_embed_trl.mining import load_embedder

    rows, _, root = planted
    save_model_for_inference(qwen2_vl_model, tmp_path / "model")
    st = SentenceTransformer(str(tmp_path / "model" / "sentence_transformers"))
    items = [(r["pos_text"], r["pos_image_path"], "") for r in rows.select(range(12))]
    ours = load_embedder(qwen2_vl_model, image_root=root, batch_size=5).embed(items, "document")
    # the embedder (inputs decoded and processed in dataloader workers) embeds as the model's own encode
    encoded = qwen2_vl_model.encode([{"text": t, "image": i or None} for t, i, _ in items], side="document",
                                    image_root=root, batch_size=12)
    assert_close(torch.as_tensor(ours[0]), encoded, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    theirs = load_embedder(st, image_root=root).embed(items, "document")
    assert np.array_equal(ours[1], theirs[1])  # content keys do not depend on the model
    assert_close(torch.as_tensor(theirs[0]), torch.as_tensor(ours[0]), rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    mined, summary = mine_hard_negatives(rows, st, image_root=root, num_workers=0, num_negatives=2,
                                         work_dir=tmp_path / "work")
    assert summary.rows_mined == len(rows)


@pytest.mark.slow
def test_the_cli_on_two_ranks_equals_one_process_and_its_output_trains_through_the_example(
    shapes_data, tiny_backbone, qwen2_vl_model, tmp_path
):
    from mm_embed_trl.data.loading import load_rows_dataset

    root = shapes_data.image_root
    shapes_data["train"].select(range(96)).to_parquet(str(tmp_path / "rows.parquet"))
    options = ["--model", tiny_backbone("qwen2_vl"), "--dataset", tmp_path / "rows.parquet", "--image_root", root,
               "--num_negatives", 3, "--chunk_size", 16, "--num_workers", 1]
    launching.run("-m mm_embed_trl.mining", *options, "--output", tmp_path / "two.jsonl", processes=2,
                  launcher="torchrun", cwd=tmp_path)
    one, _ = mine_hard_negatives(tmp_path / "rows.parquet", qwen2_vl_model, image_root=root, num_negatives=3,
                                 chunk_size=16, num_workers=0)
    two = load_rows_dataset(str(tmp_path / "two.jsonl"))
    assert two["neg_text"] == one["neg_text"] and two["neg_image_path"] == one["neg_image_path"]
    assert not (tmp_path / "two.jsonl.mining-work").exists()  # removed once both ranks were done
    log = launching.run(
        ROOT / "examples" / "train_hardneg.py", "--model_name_or_path", tiny_backbone("qwen2_vl"),
        "--dataset_name", tmp_path / "two.jsonl", "--image_root", root, "--output_dir", tmp_path / "run",
        "--max_steps", 2, "--per_device_train_batch_size", 8, "--evaluate_before_training", "false",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", 1, cwd=tmp_path,
    ).output
    assert "'num_valid_negatives'" in log  # trained on the mined rows, explicit negatives included
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_cli_killed_mid_run_resumes_to_the_same_file_from_its_recipe(shapes_data, tiny_backbone, tmp_path):
    import subprocess
    import time

    root = shapes_data.image_root
    shapes_data["train"].select(range(96)).to_parquet(str(tmp_path / "rows.parquet"))

    def options(name):  # the shipped recipe, sized down on the command line
        return ["--config", ROOT / "recipes" / "mining" / "mine_mmeb_qwen2vl_2b.yaml", "--model",
                tiny_backbone("qwen2_vl"), "--dataset", tmp_path / "rows.parquet", "--split", "train", "--image_root",
                root, "--dtype", "float32", "--num_negatives", 3, "--batch_size", 4, "--chunk_size", 8,
                "--num_workers", 0, "--output", tmp_path / f"{name}.jsonl"]

    proc = launching.spawn("-m mm_embed_trl.mining", *options("killed"), cwd=tmp_path, stdout=subprocess.DEVNULL)
    work = tmp_path / "killed.jsonl.mining-work"  # the default work folder, beside the output
    deadline = time.monotonic() + 300
    chunks = "embeddings-*/*/chunk-*.npz"
    while len(list(work.glob(chunks))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    still_mining = proc.poll() is None
    launching.kill_tree(proc)  # kill -9, mid-run
    _, err = proc.communicate()
    assert still_mining, f"the run ended before it could be killed: {err[-3000:]}"
    assert not (tmp_path / "killed.jsonl").exists() and not (tmp_path / "killed.mining.json").exists()
    done = {p: p.stat().st_mtime_ns for p in work.glob(chunks)}
    assert len(done) >= 2, err[-3000:]

    resumed = launching.run("-m mm_embed_trl.mining", *options("killed"), "--keep_work_dir", "true", cwd=tmp_path)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in done.items()), resumed.output  # reused, not redone
    launching.run("-m mm_embed_trl.mining", *options("fresh"), cwd=tmp_path)
    assert (tmp_path / "killed.jsonl").read_bytes() == (tmp_path / "fresh.jsonl").read_bytes()
    assert not (tmp_path / "fresh.jsonl.mining-work").exists()  # removed once the output is written
