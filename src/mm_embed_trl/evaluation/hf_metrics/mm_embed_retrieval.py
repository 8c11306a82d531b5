# Copyright the mm-embed-trl authors. Apache-2.0.
"""Retrieval metrics of mm-embed-trl as a Hugging Face `evaluate` metric (loads offline, by local path).

    import evaluate
    from mm_embed_trl.evaluation import RETRIEVAL_METRIC_PATH

    metric = evaluate.load(RETRIEVAL_METRIC_PATH)                    # one shared corpus ("corpus", the default)
    metric.compute(predictions=scores, references=relevant, k_values=[1, 5, 10])

    mmeb = evaluate.load(RETRIEVAL_METRIC_PATH, "candidates")         # MMEB: each query ranks its own candidates
    mmeb.compute(predictions=candidate_scores, references=correct_index)

The numbers are those of ``mm_embed_trl.evaluation.ranking_metrics`` / ``candidate_list_metrics`` (the module
below only converts the inputs), which match sentence-transformers' ``InformationRetrievalEvaluator`` and
VLM2Vec's MMEB protocol.
"""

import datasets
import evaluate
import torch

from mm_embed_trl.evaluation.metrics import candidate_list_metrics, ranking_metrics

_CITATION = """\
@article{jiang2024vlm2vec,
  title   = {VLM2Vec: Training Vision-Language Models for Massive Multimodal Embedding Tasks},
  author  = {Jiang, Ziyan and Meng, Rui and Yang, Xinyi and Yavuz, Semih and Zhou, Yingbo and Chen, Wenhu},
  journal = {arXiv preprint arXiv:2410.05160},
  year    = {2024}
}
"""

_DESCRIPTION = """\
Retrieval metrics for (multimodal) embedding models. Config "corpus": every query scores one shared corpus and
has a set of relevant documents; reports accuracy@k, precision@k, recall@k, mrr@k, ndcg@k, map@k and the uncut mrr
(definitions of sentence-transformers' InformationRetrievalEvaluator; ties ranked by corpus index). Config
"candidates": MMEB's protocol, each query scores its own candidate list (lists may differ in length) and one of
them is correct; reports precision@1 (plus mrr, recall@k and ndcg@k for the given k_values). Ties: the correct
candidate wins unless another scores strictly higher (VLM2Vec's np.argmax)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one list of scores per query (higher = more similar). "corpus": the scores of every corpus
        document, in corpus order (all lists the same length). "candidates": the scores of the query's own
        candidates.
    references: "corpus": the list of relevant corpus indices of each query. "candidates": the index of the
        correct candidate in each query's list.
    k_values: cutoffs (default [1, 5, 10] for "corpus", none for "candidates").
Returns:
    A dict of float metrics.
Examples:
    >>> import evaluate
    >>> from mm_embed_trl.evaluation import RETRIEVAL_METRIC_PATH
    >>> metric = evaluate.load(RETRIEVAL_METRIC_PATH)
    >>> metric.compute(predictions=[[0.9, 0.1, 0.3], [0.2, 0.1, 0.8]], references=[[0], [1]], k_values=[1])["mrr"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MmEmbedRetrieval(evaluate.Metric):
    """Retrieval metrics of mm-embed-trl (shared corpus or MMEB candidate lists)."""

    def _info(self):
        if self.config_name not in ("default", "corpus", "candidates"):
            raise KeyError(f"Unknown config {self.config_name!r}: use 'corpus' (the default) or 'candidates'.")
        candidates = self.config_name == "candidates"
        reference = datasets.Value("int64") if candidates else datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": reference}
            ),
            reference_urls=["https://github.com/TIGER-AI-Lab/VLM2Vec", "https://www.sbert.net/"],
        )

    def _compute(self, predictions, references, k_values=None):
        if self.config_name == "candidates":
            return _candidate_lists(predictions, references, k_values or ())
        lengths = {len(row) for row in predictions}
        if len(lengths) != 1:
            raise ValueError(
                f"'corpus' needs one score per corpus document for every query, got lists of lengths "
                f"{sorted(lengths)}; use the 'candidates' config for per-query candidate lists."
            )
        scores = torch.tensor(predictions, dtype=torch.float64)
        return ranking_metrics(scores, [list(r) for r in references], k_values=k_values or (1, 5, 10))


def _candidate_lists(predictions, references, k_values):
    """Pad the lists into a (Q, C) matrix with the correct candidate moved to column 0 (candidate_list_metrics)."""
    lengths = torch.tensor([len(row) for row in predictions])
    correct = torch.tensor(references)
    if bool((lengths < 1).any()) or bool(((correct < 0) | (correct >= lengths)).any()):
        bad = int(((lengths < 1) | (correct < 0) | (correct >= lengths)).nonzero()[0])
        raise ValueError(
            f"query {bad}: the correct candidate {int(correct[bad])} is not an index of its {int(lengths[bad])} "
            "candidates."
        )
    scores = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(row, dtype=torch.float64) for row in predictions], batch_first=True
    )
    rows = torch.arange(len(predictions))
    first, right = scores[:, 0].clone(), scores[rows, correct].clone()
    scores[rows, correct], scores[:, 0] = first, right  # a swap; the order of the others does not matter
    return candidate_list_metrics(scores, lengths, k_values=k_values)
