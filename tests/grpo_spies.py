"""Test helper: watch what EmbeddingGRPOTrainer scores (its TRL `_calculate_rewards` hook)."""

from __future__ import annotations


def capture_rewards(trainer) -> dict:
    """Wrap the trainer's reward computation; the returned dict fills with the last call's ``inputs`` (the rows),
    ``completions`` (token ids) and ``rewards`` (global rows x reward functions)."""
    captured: dict = {}
    original = trainer._calculate_rewards

    def spy(inputs, prompts, completions, completion_ids_list):
        rewards = original(inputs, prompts, completions, completion_ids_list)
        captured.update(inputs=inputs, completions=completion_ids_list, rewards=rewards.clone())
        return rewards

    trainer._calculate_rewards = spy
    return captured
