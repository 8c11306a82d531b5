"""Metric scripts for Hugging Face `evaluate`, loaded by path: ``evaluate.load(RETRIEVAL_METRIC_PATH)``."""

from pathlib import Path

RETRIEVAL_METRIC_PATH = str(Path(__file__).with_name("mm_embed_retrieval.py"))

__all__ = ["RETRIEVAL_METRIC_PATH"]
