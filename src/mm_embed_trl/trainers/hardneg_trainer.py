"""`HardNegContrastiveTrainer`: UniME stage 2, hard-negative enhanced contrastive instruction tuning."""

from __future__ import annotations

import torch

from ..distributed import gather_no_grad, gather_with_grad
from ..losses import hard_negative_infonce_loss
from .base import EmbeddingTrainer
from .hardneg_config import HardNegContrastiveConfig


class HardNegContrastiveTrainer(EmbeddingTrainer):
    r"""Hard-negative enhanced contrastive instruction tuning (UniME stage 2).

    For each query q_i with positive p_i, the candidates are every target in the **global** batch (all ranks,
    gathered with the local slice's gradient kept) plus the row's explicit negatives. Candidates identical to the
    positive (same text and image, e.g. classification labels shared by many queries) are never negatives; the
    false-negative filter drops c when cos(q_i, c) > cos(q_i, p_i) + β; the k most similar survivors are the hard
    negatives (repeated when fewer than k survive — the positive or a filtered candidate never re-enters); the loss
    is InfoNCE over [p_i, k hard negatives] / τ. With GradCache (`gradient_cache_chunk_size`) the batch can be far
    larger than memory allows, with the same gradients.

    Paper: Gu et al., "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs"
    (UniME), arXiv 2504.17432.

    Example:
    ```python
    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
    from mm_embed_trl.data.generated import make_shapes_dataset
    from mm_embed_trl.tiny import get_tiny_backbone

    data = make_shapes_dataset()  # or load_dataset("TIGER-Lab/MMEB-train", "ImageNet_1K") + image_root
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
    args = HardNegContrastiveConfig(output_dir="out", image_root=str(data.image_root))
    trainer = HardNegContrastiveTrainer(model=model, args=args, train_dataset=data["train"])
    trainer.train()
    trainer.save_for_inference()  # out/ (MultimodalEmbeddingModel) + out/sentence_transformers
    ```
    """

    _tag_names = ["mm-embed-trl", "unime", "contrastive", "hard-negatives"]
    method_name = "unime_stage2"

    def __init__(self, model, args: HardNegContrastiveConfig | None = None, *pargs, **kwargs):
        if args is None:
            args = HardNegContrastiveConfig(output_dir="hardneg-output")
        super().__init__(model, args, *pargs, **kwargs)

    def compute_embedding_loss(self, model, inputs):
        args: HardNegContrastiveConfig = self.args
        num_negatives = int(inputs.get("num_negatives", 0))
        sides = [inputs["query"], inputs["positive"]] + ([inputs["negative"]] if num_negatives > 0 else [])
        query, positive, *rest = self.embed(model, *sides)
        negatives = rest[0] if rest else None

        positive_ids = inputs["positive_ids"]
        negative_ids = inputs.get("negative_ids")
        if args.gather_across_devices:
            query, positive = gather_with_grad(query), gather_with_grad(positive)
            positive_ids = gather_no_grad(positive_ids)
            if negatives is not None:
                negatives, negative_ids = gather_with_grad(negatives), gather_no_grad(negative_ids)
        if query.shape[0] < 2 and negatives is None:
            raise ValueError(
                "A global batch of 1 row without explicit negatives has no negatives to contrast with: raise "
                "per_device_train_batch_size, train on more processes with gather_across_devices=True, or add "
                "neg_text/neg_image_path columns."
            )
        batch = query.shape[0]
        if negatives is not None:
            negatives = negatives.view(batch, num_negatives, -1)
            negative_ids = negative_ids.view(batch, num_negatives)
        out = hard_negative_infonce_loss(
            query,
            positive,
            negatives,
            candidates=positive,
            positive_index=torch.arange(batch, device=query.device),
            candidate_duplicate_mask=positive_ids[:, None] == positive_ids[None, :],
            negative_duplicate_mask=None if negatives is None else negative_ids == positive_ids[:, None],
            temperature=args.temperature,
            margin=args.false_negative_margin if args.false_negative_filter else None,
            top_k=args.num_hard_negatives or None,
            symmetric=args.symmetric_loss,
        )
        return out.loss, out.logs
