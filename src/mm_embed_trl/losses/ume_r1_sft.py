"""UME-R1's reasoning-SFT objective (stage 1), returned in named parts.

Reference: Lan et al., "UME-R1: Exploring Reasoning-Driven Generative Multimodal Embeddings", arXiv 2511.00405,
section on cold-start SFT. Each side of a (query, target) pair gives a discriminative embedding (at ``<disc_emb>`` in
the prompt), a generative one (at the last ``<gen_emb>`` of its teacher-forced reasoning) and the summed token
cross-entropy of that reasoning. Then::

    loss = w_disc · InfoNCE(q_disc, t_disc) + w_gen · InfoNCE(q_gen, t_gen)
         + w_q · CE(query reasoning) + w_t · CE(target reasoning) [+ w_align · InfoNCE(q_disc, t_gen)]

with symmetric in-batch InfoNCE at temperature ``τ`` (UME-R1: 0.02) and each CE the token mean over the batch
(summed cross-entropy over the token count). The alignment term (not in the paper) puts both embeddings in one space.

The inputs are **gathered**: every rank's embeddings (the local rows keeping their gradient,
:func:`~mm_embed_trl.distributed.gather_with_grad`) and the global CE sums and token counts, so the loss of N
processes x B rows is that of 1 process x N·B rows; gathering is the trainer's job, this module never communicates.

Relations: each InfoNCE part is :func:`~mm_embed_trl.losses.hard_negative_infonce_loss` with ``margin=None,
top_k=None, symmetric=True`` (open_clip's ``ClipLoss``); contrastive plus generative terms from one forward, in
named parts, is the shape of open_clip's ``CoCaLoss(..., output_dict=True)``. ``discriminative_only`` training
(UME-R1's DUME) passes the discriminative embeddings alone.

Example::

    >>> import torch, torch.nn.functional as F
    >>> from mm_embed_trl.losses import UmeR1SFTLoss
    >>> q, t = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    >>> ce = (torch.tensor(12.0), torch.tensor(6.0))  # summed cross-entropy, supervised tokens
    >>> parts = UmeR1SFTLoss()(q, t, query_gen=q, target_gen=t, query_lm=ce, target_lm=ce, output_dict=True)
    >>> sorted(parts)  # doctest: +NORMALIZE_WHITESPACE
    ['disc_accuracy', 'disc_contrastive_loss', 'gen_accuracy', 'gen_contrastive_loss', 'loss', 'query_lm_loss',
     'target_lm_loss']
    >>> float(parts["query_lm_loss"])
    2.0
"""

from __future__ import annotations

from torch import Tensor, nn

from .hard_negative_infonce import hard_negative_infonce_loss

__all__ = ["UmeR1SFTLoss"]


class UmeR1SFTLoss(nn.Module):
    """UME-R1's SFT loss over gathered embeddings (see the module docstring); weights as ``EmbeddingSFTConfig``'s.

    Args:
        temperature: InfoNCE temperature ``τ`` (logit scale ``1/τ``).
        disc_contrastive_weight, gen_contrastive_weight: weights of the two InfoNCE terms.
        query_lm_weight, target_lm_weight: weights of the two cross-entropy terms.
        disc_gen_alignment_weight: weight of InfoNCE(query disc, target gen); 0 leaves the term out.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        disc_contrastive_weight: float = 1.0,
        gen_contrastive_weight: float = 1.0,
        query_lm_weight: float = 1.0,
        target_lm_weight: float = 1.0,
        disc_gen_alignment_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.disc_contrastive_weight = disc_contrastive_weight
        self.gen_contrastive_weight = gen_contrastive_weight
        self.query_lm_weight = query_lm_weight
        self.target_lm_weight = target_lm_weight
        self.disc_gen_alignment_weight = disc_gen_alignment_weight

    def contrastive(self, query: Tensor, target: Tensor, duplicates: Tensor | None) -> tuple[Tensor, Tensor]:
        """(symmetric InfoNCE, retrieval accuracy) of aligned rows; ``duplicates`` masks candidates that are no
        negatives (a seam to override, as open_clip's ``ClipLoss.get_logits``)."""
        out = hard_negative_infonce_loss(
            query, target, temperature=self.temperature, margin=None, top_k=None, symmetric=True,
            candidate_duplicate_mask=duplicates,
        )
        return out.loss, out.logs["accuracy"]

    def forward(
        self,
        query_disc: Tensor,
        target_disc: Tensor,
        *,
        query_gen: Tensor | None = None,
        target_gen: Tensor | None = None,
        query_lm: tuple[Tensor, Tensor] | None = None,
        target_lm: tuple[Tensor, Tensor] | None = None,
        candidate_duplicate_mask: Tensor | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """The weighted loss, or with ``output_dict`` its named parts: ``loss`` (the weighted sum), each term unweighted
        (``disc_contrastive_loss``, ``gen_contrastive_loss``, ``query_lm_loss``, ``target_lm_loss``,
        ``alignment_loss``) and each contrastive term's ``*_accuracy``, for the terms that were given.

        Args:
            query_disc, target_disc: ``(N, D)`` gathered discriminative embeddings, row i of each a pair.
            query_gen, target_gen: ``(N, D)`` gathered generative embeddings (reasoning SFT; None: DUME).
            query_lm, target_lm: ``(summed cross-entropy, supervised token count)`` of each side over the global batch.
            candidate_duplicate_mask: ``(N, N)`` bool, True where target j is no negative of query i.
        """
        parts: dict[str, Tensor] = {}
        loss = 0.0

        def add(name: str, weight: float, value: Tensor) -> None:
            nonlocal loss
            parts[name] = value
            loss = loss + weight * value

        mask = candidate_duplicate_mask
        disc, parts["disc_accuracy"] = self.contrastive(query_disc, target_disc, mask)
        add("disc_contrastive_loss", self.disc_contrastive_weight, disc)
        has_gen = query_gen is not None and target_gen is not None
        if has_gen:
            gen, parts["gen_accuracy"] = self.contrastive(query_gen, target_gen, mask)
            add("gen_contrastive_loss", self.gen_contrastive_weight, gen)
        lm_sides = (("query", query_lm, self.query_lm_weight), ("target", target_lm, self.target_lm_weight))
        for name, lm, weight in lm_sides:
            if lm is not None:
                total, tokens = lm
                add(f"{name}_lm_loss", weight, total / tokens.clamp_min(1))
        if has_gen and self.disc_gen_alignment_weight > 0:
            align, parts["alignment_accuracy"] = self.contrastive(query_disc, target_gen, mask)
            add("alignment_loss", self.disc_gen_alignment_weight, align)
        if not output_dict:
            return loss
        return {"loss": loss, **parts}
