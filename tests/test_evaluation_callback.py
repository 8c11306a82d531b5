"""EmbeddingEvalCallback inside a real Trainer run: the train-end evaluation under load_best_model_at_end."""

from __future__ import annotations

import pytest

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.evaluation import EmbeddingEvalCallback


class _Drift:
    """evaluator(model) -> {"drift": squared distance of the weights from where training started}. It grows with
    every step, so with greater_is_better=False the first checkpoint is the best; and it tells weights apart."""

    def __init__(self, model):
        self.start = [p.detach().clone() for p in model.parameters()]

    def __call__(self, model):
        drift = sum(float((p.detach().double() - s.double()).pow(2).sum()) for p, s in zip(model.parameters(),
                                                                                              self.start))
        return {"drift": drift}


def test_train_end_evaluates_the_best_checkpoint_loaded_at_the_end(tiny_backbone, shapes_data, tmp_path):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    config = HardNegContrastiveConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to="none", use_cpu=True,
        logging_steps=1, temperature=0.05, num_negatives=0, image_root=str(shapes_data.image_root), max_steps=2,
        learning_rate=1e-3, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
        load_best_model_at_end=True, metric_for_best_model="drift", greater_is_better=False,
    )
    trainer = HardNegContrastiveTrainer(
        model=model, args=config, train_dataset=shapes_data["train"].select(range(16)),
        eval_dataset=shapes_data["eval"].select(range(8)),
    )
    cb = EmbeddingEvalCallback(_Drift(model), evaluate_on_train_end=True).attach(trainer)
    trainer.train()

    assert trainer.state.global_step == 2 and trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    evaluated = {h["step"]: h["eval_drift"] for h in cb.history if h["event"] == "evaluate"}
    assert set(evaluated) == {1, 2} and 0 < evaluated[1] < evaluated[2]
    # The train-end run evaluated the best checkpoint (step 1's weights, loaded at step 2), not the final weights.
    train_end = [h for h in cb.history if h["event"] == "train_end"]
    assert len(train_end) == 1 and train_end[0]["step"] == 2
    assert train_end[0]["eval_drift"] == pytest.approx(evaluated[1], rel=1e-6)
    assert train_end[0]["eval_drift"] == pytest.approx(cb.evaluate(trainer.model)["eval_drift"], rel=1e-12)
    logged = [e["eval_drift"] for e in trainer.state.log_history if "eval_drift" in e and "eval_loss" not in e]
    assert logged == pytest.approx([evaluated[1], evaluated[2], evaluated[1]], rel=1e-6)  # train_end logged too
