"""Generative embeddings (UME-R1): generate a reasoning, then read the state at its last ``<gen_emb>``.

Two phases per batch, both batched:

1. **Generate** from the left-padded prompt batch (greedy or sampled, ``max_new_tokens``): token ids only, no hidden
   states kept (``generate(output_hidden_states=True)`` costs steps x layers x batch x hidden of memory, and TRL's and
   vLLM's generation return none).
2. **Prefill** once, without grad, over prompt + completion laid out as training lays it out
   (:func:`mm_embed_trl.data.reasoning.append_completions`), and read the last-layer state at the last ``<gen_emb>``
   *inside the completion* (the prompt's instruction holds a ``<gen_emb>`` of its own). The same forward gives the
   discriminative embedding at ``<disc_emb>`` in the prompt, so ``mode="both"`` costs nothing more.

Generation never writes the image/video placeholder tokens (``suppress_tokens``, as TRL's GRPO generation does):
the prefill forward would expand each one into image features it does not have. A completion from ``generate_fn``
that holds one is an error naming the row.

Phase 2 is :func:`embed_completions`, the one place that embeds prompt + completion at the last ``<gen_emb>``: encode
calls it after its own generation, ``EmbeddingGRPOTrainer``'s retrieval reward after TRL's (through the policy as TRL
wraps it).

A completion that never writes ``<gen_emb>`` follows one of ``MISSING_TOKEN_POLICIES`` (encode's ``missing_token``,
``EmbeddingGRPOConfig.missing_gen_token``): ``"last_token"`` (UME-R1's fallback: the state at the completion's last
token), ``"discriminative"`` (that row's discriminative embedding), ``"zero"`` (a zero vector: every similarity, hence
a retrieval reward, is 0) or ``"error"``; encode counts such rows in one warning per call, and every completion cut
short by ``max_new_tokens`` too (the usual reason for a missing ``<gen_emb>``; UME-R1 evaluates with up to
``UME_R1_MAX_NEW_TOKENS``).

Generation can run elsewhere (e.g. vLLM): pass ``generate_fn(prompt_batch, generation_kwargs) -> list[list[int]]``
returning each row's completion token ids; the prefill phase stays here (it needs the hidden states vLLM does not
return). See ``docs/DESIGN.md`` (Model, "Generative encode").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.schema import BATCH_METADATA_KEYS

logger = logging.getLogger(__name__)

MODES = ("discriminative", "generative", "both")
# What stands for the generative embedding of a completion without <gen_emb> (see the module docstring).
MISSING_TOKEN_POLICIES = ("last_token", "discriminative", "zero", "error")
# New tokens per reasoning at inference, as UME-R1 evaluates (README: --max_new_tokens 8192; it trains RL at 2048).
UME_R1_MAX_NEW_TOKENS = 8192


def sampling_settings(model, *, temperature: float, top_p: float, top_k: int, min_p: float | None = None) -> dict:
    """``generate`` options that sample with exactly these settings, whatever the backbone's generation config says.

    ``generate`` fills every option left unset from ``backbone.generation_config``, and hub checkpoints ship sampling
    defaults there (Qwen2-VL-Instruct: ``top_k=1, top_p=0.001, temperature=0.01``, i.e. greedy): every warper is
    therefore set here, to its value or to "off" (``top_k=0``, ``typical_p=1``, ``min_p=0``, no cut-offs).
    """
    config = getattr(model.backbone, "generation_config", None)
    top_h = getattr(config, "top_h", None)
    if top_h is not None:
        raise ValueError(
            f"The backbone's generation_config sets top_h={top_h}, which generate() cannot switch off per call; "
            "set model.backbone.generation_config.top_h = None to sample with encode's settings."
        )
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, typical_p=1.0,
                    epsilon_cutoff=0.0, eta_cutoff=0.0)
    if min_p is not None or getattr(config, "min_p", None) is not None:
        settings["min_p"] = 0.0 if min_p is None else min_p  # min_p=0 keeps every token
    return settings


@dataclass
class CompletionEmbeddings:
    """The embeddings read off one forward over prompt + completion (see :func:`embed_completions`)."""

    generative: torch.Tensor  # (rows, dim): the state at the completion's last <gen_emb> (else its last token)
    discriminative: torch.Tensor  # (rows, dim): the state at the prompt's <disc_emb>
    found: torch.Tensor  # (rows,) bool: the completion wrote <gen_emb>


@dataclass
class GenerativeBatch(CompletionEmbeddings):
    """One batch of generative encoding: the embeddings read after generation and what was generated."""

    completion_ids: list[list[int]]
    cut_short: torch.Tensor  # (rows,) bool: the completion reached max_new_tokens without a stop token


def stop_ids(model) -> set[int]:
    """Token ids that end a completion: the generation config's EOS ids and the tokenizer's."""
    ids = set()
    config = getattr(model.backbone, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids}


_PLACEHOLDER_ATTRIBUTES = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")


def placeholder_ids(model) -> list[int]:
    """The backbone's image/video placeholder token ids: the processor expands them, a completion must not hold one."""
    config = model.backbone.config
    ids = {getattr(config, name, None) for name in _PLACEHOLDER_ATTRIBUTES}
    return sorted(int(i) for i in ids if isinstance(i, int) and i >= 0)


def generate_completions(model, prompt: dict[str, Any], generation_kwargs: dict[str, Any]) -> list[list[int]]:
    """Each row's completion ids from ``model.backbone.generate`` on a left-padded prompt batch, cut after the first
    stop token (which is kept, as TRL keeps it). The placeholder tokens are suppressed (added to any the caller
    passes in ``suppress_tokens``)."""
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    inputs = {k: v for k, v in prompt.items() if k not in BATCH_METADATA_KEYS}  # generate takes model inputs only
    kwargs = {"pad_token_id": tokenizer.pad_token_id, **generation_kwargs}
    suppressed = sorted({*map(int, kwargs.get("suppress_tokens") or ()), *placeholder_ids(model)})
    if suppressed:
        kwargs["suppress_tokens"] = suppressed
    sequences = model.backbone.generate(**inputs, **kwargs)
    new = sequences[:, prompt["input_ids"].shape[1] :].tolist()
    stops = stop_ids(model)
    completions = []
    for row in new:
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        completions.append(row[:end])
    return completions


def embedding_token_ids(model) -> tuple[int, int]:
    """(``<disc_emb>`` id, ``<gen_emb>`` id) of a model trained for generative embeddings (UME-R1)."""
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    gen_token = model.config.generative_pooling_token
    disc_id = model.config.pooling_token_id
    if gen_token is None or disc_id is None:
        raise ValueError(
            "This model has no generative embedding: config.generative_pooling_token (e.g. '<gen_emb>') and "
            "special-token pooling at '<disc_emb>' are set by EmbeddingSFTTrainer (UME-R1 reasoning SFT)."
        )
    return disc_id, tokenizer.convert_tokens_to_ids(gen_token)


@torch.no_grad()
def embed_completions(
    model, prompt: dict[str, Any], completion_ids: Sequence[Sequence[int]], *, run_backbone=None
) -> CompletionEmbeddings:
    """Embed each row's prompt + completion in one no-grad forward: the generative embedding at the last ``<gen_emb>``
    *inside the completion* (the prompt's instruction holds a copy), the discriminative one at the prompt's
    ``<disc_emb>``.

    Args:
        model: a :class:`~mm_embed_trl.modeling.MultimodalEmbeddingModel` trained for generative embeddings.
        prompt: a left-padded prompt batch, as ``EmbeddingCollator.encode_inputs`` makes it.
        completion_ids: each row's completion token ids (generated by ``generate``, TRL or vLLM).
        run_backbone: the module to run in place of ``model.backbone`` (the same weights as the trainer wraps them:
            TRL's policy under DDP, DeepSpeed or FSDP); default: the model's own forward.
    """
    from ..data.reasoning import append_completions
    from .pooling import TokenPooling

    disc_id, gen_id = embedding_token_ids(model)
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    batch = append_completions(prompt, [list(map(int, c)) for c in completion_ids], tokenizer.pad_token_id)
    pools = {"disc": TokenPooling(disc_id, "prompt"), "gen": TokenPooling(gen_id, "completion")}
    out = model(**batch, pool_tokens=pools, run_backbone=run_backbone)
    return CompletionEmbeddings(
        generative=out.named_embeddings["gen"],
        discriminative=out.named_embeddings["disc"],
        found=out.named_token_found["gen"],
    )


@torch.no_grad()
def encode_generative_batch(
    model,
    prompt: dict[str, Any],
    *,
    generation_kwargs: dict[str, Any],
    generate_fn: Callable[[dict[str, Any], dict[str, Any]], Sequence[Sequence[int]]] | None = None,
) -> GenerativeBatch:
    """Generate for one prompt batch, then :func:`embed_completions` reads the disc and gen embeddings."""
    if model.lm_head is None:
        raise ValueError(
            "Generative embeddings need a backbone that can generate: load the model with encoder_kind='generative'."
        )
    embedding_token_ids(model)  # refuse a model without generative embeddings before generating
    completions = (generate_fn or (lambda p, kw: generate_completions(model, p, kw)))(prompt, generation_kwargs)
    completions = [list(map(int, c)) for c in completions]
    _check_no_placeholders(completions, placeholder_ids(model))
    embedded = embed_completions(model, prompt, completions)
    return GenerativeBatch(
        generative=embedded.generative,
        discriminative=embedded.discriminative,
        found=embedded.found,
        completion_ids=completions,
        cut_short=_cut_short(completions, stop_ids(model), generation_kwargs.get("max_new_tokens")),
    )


def _cut_short(completions: list[list[int]], stops: set[int], max_new_tokens: int | None) -> torch.Tensor:
    """Which completions the length limit ended: as long as the limit, and not ended by a stop token."""
    if max_new_tokens is None:
        return torch.zeros(len(completions), dtype=torch.bool)
    return torch.tensor([len(c) >= max_new_tokens and not (c and c[-1] in stops) for c in completions],
                        dtype=torch.bool)


def _check_no_placeholders(completions: list[list[int]], placeholders: list[int]) -> None:
    if not placeholders:
        return
    banned = set(placeholders)
    rows = [i for i, c in enumerate(completions) if banned.intersection(c)]
    if rows:
        raise ValueError(
            f"Completion(s) of batch row(s) {rows[:10]} hold an image/video placeholder token (ids {placeholders}); "
            "the prefill forward cannot give them image features. Suppress these ids in the generation "
            "(`suppress_tokens` for transformers; vLLM: `SamplingParams(logit_bias={id: -100})`)."
        )


def apply_missing_token_policy(batch: CompletionEmbeddings, policy: str) -> torch.Tensor:
    """The generative embeddings with ``policy`` (one of ``MISSING_TOKEN_POLICIES``) applied to rows whose completion
    lacks ``<gen_emb>``."""
    if policy not in MISSING_TOKEN_POLICIES:
        raise ValueError(f"missing_token={policy!r} is not one of {MISSING_TOKEN_POLICIES}.")
    missing = ~batch.found
    if policy == "last_token":
        return batch.generative
    if policy == "zero":  # no host sync: a mask, not a test
        return batch.generative * batch.found[:, None].to(batch.generative.dtype)
    if not bool(missing.any()):
        return batch.generative
    if policy == "error":
        rows = missing.nonzero().flatten().tolist()
        raise ValueError(
            f"Completion(s) of batch row(s) {rows} never wrote the generative token; raise max_new_tokens, or pass "
            "missing_token='last_token' / 'discriminative' / 'zero'."
        )
    return torch.where(missing[:, None], batch.discriminative, batch.generative)
