"""UME-R1's format reward: 1 when a rollout reasons, answers and ends in the embedding token, else 0.

Reference: Lan et al., UME-R1, arXiv 2511.00405; public code ``format_reward_embed`` of
``src/r1-train/src/open_r1/vlm_modules/qwen_module.py``, whose regex is kept verbatim::

    r_format = 1  if re.search(r"<think>.*?</think>.*?\\s*<answer>.*?\\s*<gen_emb>", completion, re.DOTALL)
               0  otherwise

The pattern only asks for the three tags in that order (``</answer>`` is optional, as in UME-R1's SFT data).
It is checked on the *decoded* completion, so ``<gen_emb>`` must be an ordinary added token: TRL decodes with
``skip_special_tokens=True``, which would erase a special one and make this reward always 0.

The function has TRL's reward-function signature: ``GRPOTrainer`` calls it as
``f(prompts=..., completions=..., completion_ids=..., **columns)`` and it returns one float per completion.
A completion is a string (standard format) or a list of messages (conversational format,
``[{"role": "assistant", "content": ...}]``, content a string or a list of ``{"type": "text", "text": ...}``
parts); the text of every assistant message is checked, in order.

Relations: UME-R1 adds it to the retrieval reward with weight 1
(:func:`~mm_embed_trl.rewards.ume_r1_retrieval_reward`).

Example::

    >>> from mm_embed_trl.rewards import ume_r1_format_reward
    >>> ume_r1_format_reward(["<think>a red circle</think><answer>circle<gen_emb>", "circle<gen_emb>"])
    [1.0, 0.0]
    >>> ume_r1_format_reward([[{"role": "assistant", "content": "<think>.</think>\\n<answer>x</answer><gen_emb>"}]])
    [1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.templates import UME_R1_FORMAT

__all__ = ["completion_text", "ume_r1_format_reward"]


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
    raise TypeError(f"{where}: message content of type {type(content).__name__}; expected a str or a list of parts.")


def completion_text(completion: Any, *, where: str = "completion") -> str:
    """The generated text of one TRL completion (a string, or the assistant messages of a conversation)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(isinstance(m, dict) for m in completion):
        return "".join(
            _content_text(m.get("content"), where) for m in completion if m.get("role", "assistant") == "assistant"
        )
    raise TypeError(
        f"{where} has type {type(completion).__name__}; expected a str or a list of chat messages "
        '[{"role": "assistant", "content": ...}].'
    )


def ume_r1_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for each completion matching ``<think>…</think>…<answer>…<gen_emb>``, else 0.0 (see module docstring).

    Args:
        completions: TRL's completions (strings or lists of messages), one per rollout.
        **kwargs: ``prompts``, ``completion_ids``, the dataset columns and TRL's extras; ignored.
    """
    return [
        1.0 if UME_R1_FORMAT.search(completion_text(c, where=f"completions[{i}]")) else 0.0
        for i, c in enumerate(completions)
    ]
