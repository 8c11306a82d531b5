"""`EmbeddingSFTTrainer`: UME-R1 stage 1, reasoning SFT with discriminative and generative embeddings."""

from __future__ import annotations

import logging
import os

import torch

from ..data.templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN
from ..distributed import gather_no_grad, gather_with_grad
from ..losses import UmeR1SFTLoss
from ..modeling.pooling import TokenPooling
from ..modeling.preparation import prepare_embedding_tokens
from .base import EmbeddingTrainer
from .papers import UME_R1_PAPER
from .sft_config import EmbeddingSFTConfig

logger = logging.getLogger(__name__)


class EmbeddingSFTTrainer(EmbeddingTrainer):
    r"""Reasoning SFT that teaches discriminative and generative embeddings (UME-R1 stage 1).

    Each side of a (query, target) pair is prompted with UME-R1's instruction after a ``<disc_emb>`` token and
    trained to write ``<think>reasoning</think><answer>summary</answer><gen_emb>``. ONE forward per side yields the
    discriminative embedding (last-layer state at ``<disc_emb>``, in the prompt), the generative one (at the last
    ``<gen_emb>`` of the completion, teacher-forced) and the language-model loss on the completion. The loss is

        w_gen · InfoNCE(gen) + w_disc · InfoNCE(disc) + w_q · CE(query reasoning) + w_t · CE(target reasoning)

    (:class:`~mm_embed_trl.losses.UmeR1SFTLoss`, its named parts logged) with symmetric InfoNCE at logit scale
    1/τ = 50 over the **global** batch (every rank's targets, gathered with
    the local gradient kept) and each CE the token mean over the global batch, so N processes x B rows train exactly
    like 1 process x N·B rows. With GradCache (`gradient_cache_chunk_size`) the batch can be far larger than memory
    allows: each chunk's two embeddings and its summed CE are cached from one no-grad forward and back-propagated
    from one re-forward, with the same gradients. UME-R1 contrasted 256 pairs per loss (4 per GPU x 64 GPUs) and
    accumulated 4 such losses per step: the recipes do the same on 8 GPUs (32 each, GA 4), and
    `contrastive_group_size` contrasts groups of a larger batch apart, as accumulated micro-batches.

    Options beyond the paper: `discriminative_only` (UME-R1's DUME variant: no reasoning, no generation) and
    `disc_gen_alignment_weight` (one space for both embeddings: index a corpus with generative embeddings once, query
    it with cheap discriminative ones). Before training, ``<disc_emb>`` and ``<gen_emb>`` are added to the tokenizer
    as ordinary tokens (their input rows initialised as UME-R1 does), and the trained model encodes with
    ``encode(mode="discriminative" | "generative" | "both")``.

    Paper: Lan et al., "UME-R1: Exploring Reasoning-Driven Generative Multimodal Embeddings", arXiv 2511.00405.

    Example:
    ```python
    from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer, MultimodalEmbeddingModel
    from mm_embed_trl.demo.generated import make_shapes_dataset
    from mm_embed_trl.demo.tiny import get_tiny_backbone

    data = make_shapes_dataset()  # rows carry qry_reasoning / pos_reasoning
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")), encoder_kind="generative")
    args = EmbeddingSFTConfig(output_dir="out", image_root=str(data.image_root))
    trainer = EmbeddingSFTTrainer(model=model, args=args, train_dataset=data["train"])
    trainer.train()
    trainer.save_for_inference()
    model.encode(["a red circle"], mode="generative")
    ```
    """

    _tag_names = ["mm-embed-trl", "ume-r1", "reasoning", "generative-embedding"]
    _name = "Embedding SFT"
    _paper = UME_R1_PAPER
    config_class = EmbeddingSFTConfig
    method_key = "ume_r1_sft"
    method_aliases = ("sft", "embeddingsft", "embeddingsftconfig", "embeddingsfttrainer", "ume_r1_stage1")
    method_title = "UME-R1 stage 1: reasoning SFT with discriminative and generative embeddings"
    method_short_title = "UME-R1 SFT"
    method_description = (
        "Cold-start supervised fine-tuning: the model learns to write a reasoning and a summary ending in "
        "<gen_emb>, with InfoNCE on the <disc_emb> (discriminative) and <gen_emb> (generative) embeddings plus "
        "cross-entropy on the reasoning of both sides."
    )

    def __init__(self, model, args: EmbeddingSFTConfig | None = None, *pargs, **kwargs):
        if args is None:
            args = EmbeddingSFTConfig(output_dir="sft-output")
        if not isinstance(args, EmbeddingSFTConfig):
            raise TypeError(f"EmbeddingSFTTrainer needs an EmbeddingSFTConfig, got {type(args).__name__}.")
        if isinstance(model, (str, os.PathLike)) and args.needs_reasoning:  # loaded by the base, after the data check
            args.model_init_kwargs = {"encoder_kind": "generative", **(args.model_init_kwargs or {})}
        super().__init__(model, args, *pargs, **kwargs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self._disc_id, self._gen_id = tokenizer.convert_tokens_to_ids([DISC_EMB_TOKEN, GEN_EMB_TOKEN])
        self.loss_fn = UmeR1SFTLoss(
            temperature=args.temperature,
            disc_contrastive_weight=args.disc_contrastive_weight,
            gen_contrastive_weight=args.gen_contrastive_weight,
            query_lm_weight=args.query_lm_weight,
            target_lm_weight=args.target_lm_weight,
            disc_gen_alignment_weight=args.disc_gen_alignment_weight,
        )

    def prepare_model(self, model, processing_class, args) -> None:
        if args.needs_reasoning and model.lm_head is None:
            raise ValueError(
                "Reasoning SFT trains the language-model head, but this model was loaded without one: use "
                "MultimodalEmbeddingModel.from_pretrained(<backbone>, encoder_kind='generative'), or set "
                "discriminative_only=True."
            )
        prepare_embedding_tokens(model, processing_class)

    def _generation_settings(self) -> dict:
        return {"max_new_tokens": self.args.max_new_tokens}

    def default_collator(self, model, processing_class, args):
        if not args.needs_reasoning:
            return super().default_collator(model, processing_class, args)
        from ..data.reasoning import ReasoningCollator

        return ReasoningCollator(
            processing_class,
            template=model.config.prompt_template,
            image_root=args.image_root,
            max_length=args.max_sequence_length,
            max_text_length=args.max_length,
        )

    def compute_embedding_loss(self, model, inputs):
        args: EmbeddingSFTConfig = self.args
        reasoning = args.needs_reasoning
        pools = {"disc": TokenPooling(self._disc_id, "prompt" if reasoning else "all")}
        if reasoning:
            pools["gen"] = TokenPooling(self._gen_id, "completion")

        def select(out):
            disc = out.named_embeddings["disc"]
            if not reasoning:
                return (disc,)
            found = out.named_token_found["gen"].to(disc.dtype)
            # per-call sums as (1,) tensors: GradCache caches them per chunk, gathers add them over ranks
            return disc, out.named_embeddings["gen"], out.lm_loss_sum.view(1), out.lm_num_tokens.view(1).float(), found

        sides = [{**inputs[side], "pool_tokens": pools} for side in ("query", "positive")]
        query, target = self.embed(model, *sides, select=select)
        positive_ids = gather_no_grad(inputs["positive_ids"]) if args.gather_across_devices else inputs["positive_ids"]
        duplicates = positive_ids[:, None] == positive_ids[None, :] if args.mask_duplicate_targets else None
        if args.contrastive_group_size is not None:  # pairs of other groups are never candidates
            group = torch.arange(len(positive_ids), device=positive_ids.device) // args.contrastive_group_size
            other_group = group[:, None] != group[None, :]
            duplicates = other_group if duplicates is None else duplicates | other_group
        gather = gather_with_grad if args.gather_across_devices else (lambda t: t)
        gather_counts = gather_no_grad if args.gather_across_devices else (lambda t: t)
        reasoning_parts = {}
        if reasoning:
            # the token mean over the global batch: every rank's summed CE over every rank's token count
            reasoning_parts = {
                "query_gen": gather(query[1]),
                "target_gen": gather(target[1]),
                **{
                    f"{name}_lm": (gather(side[2].sum().view(1)).sum(), gather_counts(side[3].sum().view(1)).sum())
                    for name, side in (("query", query), ("target", target))
                },
            }
        parts = self.loss_fn(
            gather(query[0]), gather(target[0]), **reasoning_parts, candidate_duplicate_mask=duplicates,
            output_dict=True,
        )
        loss = parts.pop("loss")
        metrics = {name: value.detach() for name, value in parts.items()}
        if reasoning:
            metrics["gen_emb_found_rate"] = torch.cat([query[4], target[4]]).detach().mean()
        return loss, metrics
