"""Rewards of embedding rollouts, as TRL keeps its own in ``trl/rewards/``: one file per reward, one table of names.

Two kinds, each with one signature:

* **Completion rewards** score each rollout's text alone, with TRL's reward-function signature
  ``f(completions, **kwargs) -> list[float]`` (TRL passes ``prompts``, ``completion_ids`` and the dataset columns as
  keywords): :func:`ume_r1_format_reward`. Hand them to ``EmbeddingGRPOTrainer(reward_funcs=...)`` as any TRL reward.
* **Retrieval rewards** score each rollout's embedding against the other rollouts of its pool, with the signature
  of :class:`RetrievalReward`::

      f(embeddings, side, pair_id, num_generations, *, duplicate_mask=None, content_ids=None, pool_id=None,
        normalize=True) -> RetrievalRewardOutput

  ``RETRIEVAL_REWARDS`` maps the names ``EmbeddingGRPOConfig.retrieval_reward`` accepts to them; the config's
  choices and the trainer's lookup both read it, so a new retrieval reward is one file and one entry here.
  :class:`RolloutRetrievalReward` hands one to TRL as a reward function (it embeds the rollouts with the policy and
  scores the pool of every rank).

Example::

    >>> from mm_embed_trl.rewards import RETRIEVAL_REWARDS
    >>> sorted(RETRIEVAL_REWARDS)
    ['reciprocal_rank', 'ume_r1']
"""

from .format import completion_text, ume_r1_format_reward
from .reciprocal_rank import reciprocal_rank_reward
from .retrieval import (
    RetrievalPool,
    RetrievalReward,
    RetrievalRewardOutput,
    positive_negative_means,
    retrieval_pool,
    top_g_rank,
    ume_r1_retrieval_reward,
)
from .rollouts import RolloutRetrievalReward

RETRIEVAL_REWARDS: dict[str, RetrievalReward] = {
    "ume_r1": ume_r1_retrieval_reward,
    "reciprocal_rank": reciprocal_rank_reward,
}

__all__ = [
    "RETRIEVAL_REWARDS",
    "RetrievalPool",
    "RetrievalReward",
    "RetrievalRewardOutput",
    "RolloutRetrievalReward",
    "completion_text",
    "positive_negative_means",
    "reciprocal_rank_reward",
    "retrieval_pool",
    "top_g_rank",
    "ume_r1_format_reward",
    "ume_r1_retrieval_reward",
]
