"""The one place that turns a backbone's last hidden states into embedding vectors.

* ``last_token``: hidden state at the last non-padding position. Computed from the attention mask, so it is
  correct under left *and* right padding (UniME / VLM2Vec / E5-V pool the end of an "in one word" prompt).
* ``mean``: attention-masked mean over positions.
* ``special_token``: hidden state at the *last* occurrence of a given token id (UME-R1's ``<disc_emb>`` /
  ``<gen_emb>``). Rows without the token fall back to the last token (UME-R1 does the same for rollouts that
  never emitted ``<gen_emb>``); callers that need to know get the mask of rows that had it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLING_MODES = ("last_token", "mean", "special_token")


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position per row, whatever the padding side."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.to(positions.dtype) * (positions + 1)).argmax(dim=-1)


def special_token_indices(
    input_ids: torch.Tensor, token_id: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the last occurrence of ``token_id`` per row, bool mask of rows that contain it).

    Rows without the token get their last attended position instead.
    """
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    is_token = input_ids == token_id
    if attention_mask is not None:
        is_token = is_token & attention_mask.bool()
    found = is_token.any(dim=-1)
    idx = torch.where(is_token, positions, -1).amax(dim=-1)
    if attention_mask is None:
        fallback = torch.full_like(idx, input_ids.shape[-1] - 1)
    else:
        fallback = last_token_indices(attention_mask)
    return torch.where(found, idx, fallback), found


def pool(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mode: str = "last_token",
    input_ids: torch.Tensor | None = None,
    token_id: int | None = None,
) -> torch.Tensor:
    """Pool ``hidden_states`` (B, T, H) to (B, H)."""
    if mode == "last_token":
        idx = last_token_indices(attention_mask)
    elif mode == "special_token":
        if token_id is None or input_ids is None:
            raise ValueError("pooling='special_token' needs `input_ids` and the token id (config.pooling_token_id).")
        idx, _ = special_token_indices(input_ids, token_id, attention_mask)
    elif mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    else:
        raise ValueError(f"Unknown pooling mode {mode!r}; choose one of {POOLING_MODES}.")
    batch = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[batch, idx]


def finalize_embeddings(embeddings: torch.Tensor, *, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Optionally truncate to the first ``dim`` features (Matryoshka-style), then L2-normalise."""
    if dim is not None:
        if dim > embeddings.shape[-1]:
            raise ValueError(f"embedding_dim={dim} exceeds the backbone hidden size {embeddings.shape[-1]}.")
        embeddings = embeddings[..., :dim]
    if normalize:
        # normalise in float32: bf16 norms of 4k-dim vectors lose ~3 digits
        embeddings = F.normalize(embeddings.float(), p=2, dim=-1).to(embeddings.dtype)
    return embeddings


# Where a named token is looked for (see TokenPooling): the whole row, or the parts before / from `completion_start`.
POOL_REGIONS = ("all", "prompt", "completion")


@dataclass(frozen=True)
class TokenPooling:
    """Pool the hidden state at the LAST occurrence of ``token_id`` within ``region`` of each row.

    ``region="completion"`` counts only positions ``>= completion_start`` (the prompt of UME-R1 holds a copy of
    ``<gen_emb>`` in its instruction, which must never stand in for the one the model writes); ``"prompt"`` only those
    before it. A row without the token there pools the region's last attended position (``token_found`` says which).
    """

    token_id: int
    region: str = "all"

    def __post_init__(self):
        if self.region not in POOL_REGIONS:
            raise ValueError(f"TokenPooling region {self.region!r} is not one of {POOL_REGIONS}.")
