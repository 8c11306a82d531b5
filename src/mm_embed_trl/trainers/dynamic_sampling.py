"""DAPO's dynamic sampling for :class:`EmbeddingGRPOTrainer`: advantage groups whose rewards do not spread are
replaced by groups with a spread from extra generation batches.

A group of ``G`` rollouts with equal rewards gets zero advantage: with ``beta = 0`` its rows add nothing to the
gradient but still fill the batch (and cost their forward and backward). DAPO (Yu et al. 2025, arXiv 2503.14476,
section 3.2, "dynamic sampling") over-samples and keeps only groups with a spread, so that every step holds a full
batch of informative groups. Here a generation batch is scored as usual; while a rank holds fewer informative rows
than its batch, another generation batch of other pairs is generated and scored (each in its own retrieval pool),
up to a number of rounds; the batch is then rebuilt from the informative groups in the order they were generated,
topped up with zero-spread groups of the first round when the rounds ran out.

This module holds the two pure steps: which groups spread (TRL's own test) and the rebuilt batch (rows of several
TRL generation outputs in one, padded as TRL pads them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["group_has_spread", "select_rows"]

# Output keys whose rows are prompt-aligned (left padding), prompt + completion aligned, or per row and not padded.
_LEFT_PADDED = ("prompt_ids", "prompt_mask")
_PROMPT_AND_COMPLETION = ("mm_token_type_ids", "token_type_ids")


def group_has_spread(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Whether each group of ``num_generations`` consecutive rows has rewards that differ, scored as TRL scores them
    (``sum_then_normalize``: weighted ``nansum`` over the reward functions, a row that every function left unscored
    is NaN and left out) and tested as its ``frac_reward_zero_std`` metric does (``nanstd`` within the group not
    close to 0), except that a group with fewer than two scored rows (NaN std) has no spread: its advantages are 0.

    Args:
        rewards_per_func: ``(N, F)`` rewards of N rollouts (every rank's, in generation order).
        weights: ``(F,)`` reward weights.
        num_generations: rows per group.

    Returns:
        ``(N // num_generations,)`` bool.
    """
    from trl.trainer.utils import nanstd

    rewards = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    std = nanstd(rewards.view(-1, num_generations), dim=1)
    return torch.isfinite(std) & ~torch.isclose(std, torch.zeros_like(std))


def _empty_like_rows(reference: torch.Tensor) -> torch.Tensor:
    return reference.new_zeros((0, *reference.shape[1:]))


def select_rows(outputs: Sequence[dict[str, Any]], picks: Sequence[tuple[int, int]], pad_token_id: int) -> dict:
    """One TRL generation output made of rows of several: row ``j`` is row ``picks[j][1]`` of
    ``outputs[picks[j][0]]``.

    Prompts stay left-padded and completions right-padded to the widest picked row (``pad_token_id`` in the ids, 0
    in masks and per-token tensors); ``mm_token_type_ids`` (prompt + completion) is split at each output's prompt
    width and padded on both sides the same way; visual inputs follow their rows (the trainer's per-row
    ``visual_inputs``, or TRL's image fields through its ``split_pixel_values_by_grid``);
    ``num_items_in_batch`` is left to the caller (it counts every rank's tokens).
    """
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

    split = [split_pixel_values_by_grid(o) for o in outputs]
    rows = {k: o["prompt_ids"].shape[0] for k, o in enumerate(outputs)}
    prompt_width = max(outputs[k]["prompt_ids"].shape[1] for k, _ in picks)
    completion_width = max(outputs[k]["completion_ids"].shape[1] for k, _ in picks)
    keys = list(dict.fromkeys(key for o in split for key in o))
    result: dict[str, Any] = {}
    for key in keys:
        present = [o[key] for o in split if o.get(key) is not None]
        sample = present[0]
        if isinstance(sample, list):  # one entry per row: images and their metadata, num_images, visual inputs
            if key == "num_images":
                result[key] = [split[k][key][i] if key in split[k] else 0 for k, i in picks]
                continue
            if not any(torch.is_tensor(t) for values in present for t in values):  # e.g. None or a dict per row
                result[key] = [split[k][key][i] if split[k].get(key) is not None else None for k, i in picks]
                continue
            empty = _empty_like_rows(next(t for values in present for t in values))
            result[key] = [split[k][key][i] if key in split[k] else empty for k, i in picks]
            continue
        if not torch.is_tensor(sample) or sample.dim() == 0:
            result[key] = sample
            continue
        if any(torch.is_tensor(o.get(key)) and o[key].shape[0] != rows[k] for k, o in enumerate(split)):
            raise ValueError(f"Output field {key!r} is not one entry per rollout; cannot rebuild the batch.")
        pieces = []
        for k, i in picks:
            value = split[k].get(key)
            prompt, completion = outputs[k]["prompt_ids"].shape[1], outputs[k]["completion_ids"].shape[1]
            if value is None:  # e.g. mm_token_type_ids of a text-only round next to an image one
                value = sample.new_zeros((rows[k], *([prompt + completion] if key in _PROMPT_AND_COMPLETION
                                                     else sample.shape[1:])))
            row = value[i]
            if row.dim() == 0:
                pieces.append(row)
                continue
            pad = pad_token_id if key in ("prompt_ids", "completion_ids") else 0
            if key in _LEFT_PADDED:
                row = torch.nn.functional.pad(row, (prompt_width - prompt, 0), value=pad)
            elif key in _PROMPT_AND_COMPLETION:
                head = torch.nn.functional.pad(row[:prompt], (prompt_width - prompt, 0), value=pad)
                tail = torch.nn.functional.pad(row[prompt:], (0, completion_width - completion), value=pad)
                row = torch.cat([head, tail])
            elif row.shape[0] == completion:  # per completion token: completion_ids, masks, log-probs
                row = torch.nn.functional.pad(row, (0, completion_width - completion), value=pad)
            pieces.append(row)
        result[key] = torch.stack(pieces)
    return unsplit_pixel_values_by_grid(result)
