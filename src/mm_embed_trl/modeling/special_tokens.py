"""UME-R1's embedding tokens ``<disc_emb>`` / ``<gen_emb>``: added once, as ordinary tokens, initialised from rows.

They are added with ``tokenizer.add_tokens`` (not as special tokens), so ``decode(skip_special_tokens=True)`` keeps
``<gen_emb>`` in generated text (a format reward reads it there). The input-embedding rows of the new tokens (and
the LM head's, when it is not tied to them) are copied from source tokens, as UME-R1 does: Qwen2-VL
``<gen_emb> <- <|object_ref_end|>``, ``<disc_emb> <- <|object_ref_start|>``; Qwen2.5-VL and later
``</tool_call>`` / ``<tool_call>``. A backbone without the source token starts the row at the mean of all rows.
The embedding matrix is resized only when the vocabulary outgrows it (real Qwen checkpoints have spare rows), and under
DeepSpeed ZeRO-3 the rows are written inside ``GatheredParameters(modifier_rank=0)``. Calling it again changes
nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence

import torch

from ..data.templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDING_TOKEN_SOURCES", "add_embedding_tokens"]

# backbone model_type -> {new token: token whose rows it starts from} (UME-R1's train_qwen.py choices)
EMBEDDING_TOKEN_SOURCES: dict[str, dict[str, str]] = {
    "qwen2_vl": {GEN_EMB_TOKEN: "<|object_ref_end|>", DISC_EMB_TOKEN: "<|object_ref_start|>"},
    "default": {GEN_EMB_TOKEN: "</tool_call>", DISC_EMB_TOKEN: "<tool_call>"},
}


def _gathered(params: Sequence[torch.nn.Parameter]):
    """ZeRO-3 partitions parameters (they carry ``ds_id``): gather them for a write on rank 0, else do nothing."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def add_embedding_tokens(
    model,
    processor,
    tokens: Sequence[str] = (DISC_EMB_TOKEN, GEN_EMB_TOKEN),
    *,
    init_from: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Add ``tokens`` to the processor's tokenizer and the model's embeddings (idempotent); returns their ids.

    Args:
        model: a ``MultimodalEmbeddingModel`` (its backbone is resized / initialised) or a plain backbone.
        processor: the processor or tokenizer (it is modified in place; save it with the model).
        tokens: the tokens to add (UME-R1's two by default).
        init_from: ``{token: source token}`` for the new rows; default: UME-R1's choice for the backbone family.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    backbone = getattr(model, "backbone", model)
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens(new)  # ordinary tokens: decoding keeps them
    ids = {}
    for token in tokens:
        pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
        token_id = tokenizer.convert_tokens_to_ids(token)
        if pieces != [token_id] or token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer ({type(tokenizer).__name__}) cannot take {token!r} as one token (it encodes as "
                f"{pieces}); UME-R1 needs it as a single vocabulary entry. Use the backbone's fast tokenizer."
            )
        ids[token] = int(token_id)
    embeddings = backbone.get_input_embeddings()
    rows = getattr(embeddings.weight, "ds_shape", embeddings.weight.shape)[0]  # ZeRO-3 keeps the full shape there
    if len(tokenizer) > rows:  # only when the vocabulary outgrows the matrix (real Qwen checkpoints have spare rows)
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = backbone.get_input_embeddings()
    if not new:
        return ids
    model_type = getattr(backbone.config, "model_type", "")
    sources = dict(init_from or EMBEDDING_TOKEN_SOURCES.get(model_type, EMBEDDING_TOKEN_SOURCES["default"]))
    head = backbone.get_output_embeddings()
    tied = head is None or head.weight is embeddings.weight
    params = [embeddings.weight] + ([] if tied else [head.weight])
    with _gathered(params), torch.no_grad():
        for token in new:
            source = sources.get(token)
            source_id = vocab.get(source) if source is not None else None
            for weight in params:
                if source_id is not None:
                    weight[ids[token]] = weight[source_id]
                else:
                    weight[ids[token]] = weight[: len(vocab)].mean(dim=0)
            if source_id is None:
                logger.info("%s starts at the mean embedding row (the backbone has no %r).", token, source)
    return ids
