"""Student/teacher agreement: how well an embedding model reproduces a teacher's similarity structure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.distill_rows import validate_distill_dataset


@torch.no_grad()
def similarity_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cheap batch-level agreement of two embeddings of the same n rows (dimensions may differ).

    ``sim_pearson``: Pearson correlation of the n(n-1)/2 pairwise cosine similarities; ``neighbour_agreement``:
    the fraction of rows whose nearest other row is the same for both. (Held-out evaluation reports Spearman,
    :func:`~mm_embed_trl.evaluation.similarity_spearman`.)
    """
    n = student.shape[0]
    if n < 3:
        return {}
    # float64 (MPS has none): an untrained model's similarities crowd within ~1e-3 of each other, and float32
    # rounding of each one would then move the correlation in its 5th digit. n x n is cheap in any precision.
    dtype = torch.float32 if student.device.type == "mps" else torch.float64
    s = F.normalize(student.detach().to(dtype), dim=-1)
    t = F.normalize(teacher.detach().to(s.device, dtype), dim=-1)
    sim_s, sim_t = s @ s.T, t @ t.T
    iu = torch.triu_indices(n, n, offset=1, device=s.device)
    a, b = sim_s[iu[0], iu[1]], sim_t[iu[0], iu[1]]
    a, b = a - a.mean(), b - b.mean()
    denom = torch.sqrt((a * a).sum() * (b * b).sum())
    pearson = (a * b).sum() / denom  # NaN when one side has constant similarities
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    nn_s = sim_s.masked_fill(eye, -math.inf).argmax(dim=1)
    nn_t = sim_t.masked_fill(eye, -math.inf).argmax(dim=1)
    # tensors, not floats: this runs in the training step, where a float() would sync host and device
    return {"sim_pearson": pearson, "neighbour_agreement": (nn_s == nn_t).float().mean()}


class TeacherAgreementEvaluator:
    """How well a student's similarity structure matches the teacher's on held-out texts.

    Embeds ``texts`` with ``model.encode`` (the model's own prompt template) and compares them with the
    precomputed teacher vectors: ``{name}_spearman`` is the Spearman correlation of all pairwise cosine
    similarities (:func:`~mm_embed_trl.evaluation.similarity_spearman`), ``{name}_neighbour_agreement`` the
    fraction of texts whose nearest other text is the same. A callable ``evaluator(model) -> dict``, so it plugs
    into ``evaluators=[...]`` of the trainers (logged at every evaluation).

    Args:
        texts: held-out texts.
        teacher_embeddings: ``(N, D_t)`` teacher vectors of the same texts (array, tensor or list of lists).
        name: metric key prefix.
        batch_size: ``model.encode`` batch size.
        side: the prompt side used to encode (``"query"``; UniME's text prompt is the same for both).
    """

    greater_is_better = True

    def __init__(
        self,
        texts: Sequence[str],
        teacher_embeddings,
        *,
        name: str = "heldout",
        batch_size: int = 64,
        side: str = "query",
        show_progress_bar: bool | None = False,
    ):
        self.texts = list(texts)
        self.teacher = torch.as_tensor(np.asarray(teacher_embeddings, dtype=np.float32))
        if len(self.texts) < 3:
            raise ValueError(f"TeacherAgreementEvaluator needs at least 3 texts, got {len(self.texts)}.")
        if self.teacher.ndim != 2 or self.teacher.shape[0] != len(self.texts):
            raise ValueError(
                f"teacher_embeddings must be ({len(self.texts)}, dim), one vector per text; got "
                f"{tuple(self.teacher.shape)}."
            )
        self.name = name
        self.batch_size = batch_size
        self.side = side
        self.show_progress_bar = show_progress_bar
        self.primary_metric = f"{name}_spearman" if name else "spearman"

    @classmethod
    def from_dataset(
        cls,
        dataset,
        *,
        text_column: str = "text",
        teacher_column: str = "teacher_embedding",
        max_rows: int | None = None,
        **kwargs: Any,
    ) -> TeacherAgreementEvaluator:
        """Build from a dataset with texts and teacher embeddings (checked like training data)."""
        validate_distill_dataset(dataset, text_column=text_column, teacher_column=teacher_column, what="eval dataset")
        if max_rows is not None:
            dataset = dataset.select(range(min(max_rows, len(dataset))))
        table = dataset.with_format("numpy")
        return cls(list(dataset[text_column]), np.asarray(table[teacher_column], dtype=np.float32), **kwargs)

    def __repr__(self) -> str:
        dim = self.teacher.shape[1]
        return f"{type(self).__name__}(name={self.name!r}, texts={len(self.texts)}, teacher_dim={dim})"

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        from .metrics import similarity_spearman

        student = model.encode(
            self.texts, side=self.side, batch_size=self.batch_size, show_progress_bar=self.show_progress_bar
        )
        prefix = f"{self.name}_" if self.name else ""
        metrics = {f"{prefix}spearman": similarity_spearman(student, self.teacher)}
        agreement = similarity_agreement(student, self.teacher)
        metrics[f"{prefix}neighbour_agreement"] = float(agreement["neighbour_agreement"])
        return metrics
