"""`HardNegContrastiveTrainer`: UniME stage 2, hard-negative enhanced contrastive instruction tuning."""

from __future__ import annotations

import logging

import torch

from ..distributed import gather_no_grad, gather_with_grad
from ..losses import hard_negative_infonce_loss
from .base import EmbeddingTrainer
from .hardneg_config import HardNegContrastiveConfig
from .papers import UNIME_PAPER

logger = logging.getLogger(__name__)


def check_last_batch(train_dataset, args: HardNegContrastiveConfig, rows: int | None = None) -> None:
    """Before any model work: refuse batches that cannot contrast, and say what `dataloader_drop_last` leaves out.
    ``rows``: the rows an epoch draws when that is not the dataset's length (a dataset mixture's plan).

    The global batch is per_device_train_batch_size x processes. Accelerate completes the last batch of a
    multi-process epoch with rows from its start (`even_batches`), but those repeats stay out of the loss
    (`EmbeddingTrainer.without_repeated_rows`): the batch is as short as a single process's.
    """
    from ..data.schema import NEG_IMAGE, NEG_TEXT

    if train_dataset is None or not hasattr(train_dataset, "__len__"):
        return
    rows = len(train_dataset) if rows is None else rows
    per_device, world = args.per_device_train_batch_size, args.world_size
    global_batch = per_device * world
    size = f"{per_device} per device x {world} process(es) = {global_batch}"
    columns = getattr(train_dataset, "column_names", None) or []
    explicit_negatives = args.num_negatives != 0 and (NEG_TEXT in columns or NEG_IMAGE in columns)
    if global_batch == 1 and not explicit_negatives:
        raise ValueError(
            "A global batch of 1 row without explicit negatives has nothing to contrast with: raise "
            "per_device_train_batch_size, train on more processes, or add neg_text/neg_image_path columns."
        )
    remainder = rows % global_batch
    if args.dataloader_drop_last:
        if rows < global_batch:
            raise ValueError(
                f"The training dataset has {rows} rows, fewer than one global batch ({size}), and "
                "dataloader_drop_last=True (the contrastive default) drops incomplete batches: no step would run. "
                "Lower per_device_train_batch_size or use more data."
            )
        if remainder:
            logger.warning(
                "dataloader_drop_last=True (the contrastive default): each epoch leaves out %d of the %d training "
                "rows, the last incomplete global batch (%s; different rows each epoch, the data is shuffled). Set "
                "dataloader_drop_last=False (--dataloader_drop_last false) to keep them.",
                remainder, rows, size,
            )
        return
    # Rows accelerate repeats to complete the last batch across processes (even_batches) stay out of the loss.
    if remainder == 1 and not explicit_negatives:
        raise ValueError(
            f"The last batch of every epoch would hold 1 row ({rows} rows, global batch {size}), which has no "
            "negatives to contrast with, so training would stop at the end of the first epoch. Set "
            "dataloader_drop_last=True (the contrastive default), or a per_device_train_batch_size that does not "
            f"leave 1 row over ({rows} % batch != 1)."
        )


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
    from mm_embed_trl.demo.generated import make_shapes_dataset
    from mm_embed_trl.demo.tiny import get_tiny_backbone

    data = make_shapes_dataset()  # or load_dataset("TIGER-Lab/MMEB-train", "ImageNet_1K") + image_root
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
    args = HardNegContrastiveConfig(output_dir="out", image_root=str(data.image_root))
    trainer = HardNegContrastiveTrainer(model=model, args=args, train_dataset=data["train"])
    trainer.train()
    trainer.save_for_inference()  # out/ (MultimodalEmbeddingModel) + out/sentence_transformers
    ```
    """

    _tag_names = ["mm-embed-trl", "unime", "contrastive", "hard-negatives"]
    _name = "Hard-Negative Contrastive"
    _paper = UNIME_PAPER
    config_class = HardNegContrastiveConfig
    method_key = "unime_stage2"
    method_aliases = (
        "hardneg",
        "unime2",
        "unime_2",
        "hardnegcontrastive",
        "hardnegcontrastiveconfig",
        "hardnegcontrastivetrainer",
    )
    method_title = "UniME stage 2: hard-negative enhanced instruction tuning"
    method_short_title = "UniME stage 2"
    method_description = (
        "Contrastive instruction tuning on (query, target) pairs: for each query, candidates more similar than "
        "its positive plus a margin are dropped as likely false negatives, the k most similar remaining "
        "candidates (gathered from every device) are kept as hard negatives, and InfoNCE is taken over the "
        "positive and these hard negatives."
    )

    def __init__(self, model, args: HardNegContrastiveConfig | None = None, *pargs, **kwargs):
        if args is None:
            args = HardNegContrastiveConfig(output_dir="hardneg-output")
        super().__init__(model, args, *pargs, **kwargs)

    def check_datasets(self, train_dataset, eval_dataset, args):
        train_dataset, eval_dataset = super().check_datasets(train_dataset, eval_dataset, args)
        drawn = None
        if self.dataset_mixture is not None and train_dataset is not None:  # its errors too come before the model
            drawn = len(self.mixture_sampler(train_dataset, args))
        check_last_batch(train_dataset, args, drawn)
        return train_dataset, eval_dataset

    def compute_embedding_loss(self, model, inputs):
        args: HardNegContrastiveConfig = self.args
        num_negatives = int(inputs.get("num_negatives", 0))
        sides = [inputs["query"], inputs["positive"]] + ([inputs["negative"]] if num_negatives > 0 else [])
        query, positive, *rest = self.embed(model, *sides)
        negatives = rest[0] if rest else None

        positive_ids = inputs["positive_ids"]
        negative_ids = inputs.get("negative_ids")
        if negatives is not None:
            negatives = negatives.view(query.shape[0], num_negatives, -1)
            negative_ids = negative_ids.view(query.shape[0], num_negatives)
        if args.gather_across_devices:
            query, positive = gather_with_grad(query), gather_with_grad(positive)
            positive_ids = gather_no_grad(positive_ids)
            if negatives is not None:
                negatives, negative_ids = gather_with_grad(negatives), gather_no_grad(negative_ids)
            query, positive, positive_ids, negatives, negative_ids = self.without_repeated_rows(
                inputs, query, positive, positive_ids, negatives, negative_ids
            )
        if query.shape[0] < 2 and negatives is None:
            raise ValueError(
                "A global batch of 1 row without explicit negatives has no negatives to contrast with. A short last "
                "batch: set dataloader_drop_last=True (the contrastive default). Otherwise raise "
                "per_device_train_batch_size, keep gather_across_devices=True across processes, or add "
                "neg_text/neg_image_path columns."
            )
        batch = query.shape[0]
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
