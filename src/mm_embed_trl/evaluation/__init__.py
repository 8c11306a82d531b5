"""Retrieval metrics (also as an `evaluate` metric: ``evaluate.load(RETRIEVAL_METRIC_PATH)``), evaluators (shared-corpus
retrieval, MMEB per-query candidates), the MMEB-V2 harness and a Trainer callback."""

from .agreement import TeacherAgreementEvaluator, similarity_agreement
from .callback import EmbeddingEvalCallback
from .evaluator import MMEBEvaluator, ReasoningFormatEvaluator, RetrievalEvaluator
from .hf_metrics import RETRIEVAL_METRIC_PATH
from .metrics import (
    candidate_list_metrics,
    graded_ranking_metrics,
    mmeb_precision_at_1,
    ranking_metrics,
    retrieval_metrics,
    similarity_spearman,
)
from .mmeb import MMEB_EVAL_COLUMNS, load_mmeb_eval, validate_mmeb_eval_rows
from .mmeb_v2 import MMEB_V2_DATA_VERSION, MMEB_V2_TASKS, evaluate_mmeb_v2

__all__ = [
    "TeacherAgreementEvaluator",
    "similarity_agreement",
    "EmbeddingEvalCallback",
    "MMEBEvaluator",
    "MMEB_EVAL_COLUMNS",
    "RETRIEVAL_METRIC_PATH",
    "ReasoningFormatEvaluator",
    "RetrievalEvaluator",
    "MMEB_V2_DATA_VERSION",
    "MMEB_V2_TASKS",
    "candidate_list_metrics",
    "evaluate_mmeb_v2",
    "graded_ranking_metrics",
    "load_mmeb_eval",
    "mmeb_precision_at_1",
    "ranking_metrics",
    "retrieval_metrics",
    "similarity_spearman",
    "validate_mmeb_eval_rows",
]
