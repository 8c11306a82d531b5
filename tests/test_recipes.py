"""Every shipped recipe (`recipes/*.yaml`) builds and trains end to end through its example, on the tiny replica of
its backbone family: parsed by the example's own parser (`--config`), LoRA and every other setting kept, only the
sizes made tiny (batch, steps, generation lengths), the data swapped for the built-in generated data and the
precision for float32 (a CPU). The other tests only parse the recipes; `use_peft: true` in the UniME recipes crashed
at set-up (PEFT's CAUSAL_LM wrapper around a bare `Qwen2VLModel`) and nothing noticed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
EXAMPLES = {"distill_": "train_distill", "hardneg_": "train_hardneg", "sft_reasoning_": "train_sft_reasoning",
            "grpo_": "train_grpo"}
# A recipe's backbone family, from its name: the tiny replica stands in for the real checkpoint.
FAMILIES = {"qwen2vl": "qwen2_vl", "llava_ov": "llava_onevision"}

# Sizes only (and float32 on the CPU); the method's settings (LoRA, GradCache, checkpointing, temperatures, loss
# options, templates) stay as the recipe has them.
TINY = dict(
    max_steps=2, bf16=False, dataloader_num_workers=0, report_to="none", save_strategy="no",
    evaluate_before_training=False, dataset_name=None, dataset_config=None, generated_train_size=32,
    generated_eval_size=8, max_eval_samples=8, gradient_accumulation_steps=1,
)
TINY_PER_METHOD = {
    "train_distill": dict(per_device_train_batch_size=8, teacher=None, teacher_trust_remote_code=False),
    "train_hardneg": dict(per_device_train_batch_size=8, num_hard_negatives=3),
    "train_sft_reasoning": dict(per_device_train_batch_size=4, max_new_tokens=8),
    "train_grpo": dict(per_device_train_batch_size=8, num_generations=2, max_completion_length=8),
}


def _example(name: str):
    return load_script(f"examples/{name}.py")


def _tiny_recipe(recipe: str, example: str, tmp_path: Path, tiny_backbone) -> tuple[dict, str | None]:
    """(the recipe with tiny sizes, the tiny backbone it trains: None for the examples' built-in one)."""
    settings = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    settings.update(TINY, **TINY_PER_METHOD[example], output_dir=str(tmp_path / "run"))
    if settings.get("gradient_cache_chunk_size"):
        settings["gradient_cache_chunk_size"] = settings["per_device_train_batch_size"] // 2
    if "dtype" in settings:
        settings["dtype"] = "float32"
    family = next((f for key, f in FAMILIES.items() if key in recipe), None)
    backbone = None
    if family is not None:
        backbone = tiny_backbone(family)
        settings["model_name_or_path"] = backbone
    elif example == "train_grpo":  # RL starts from the SFT stage's output: the tiny backbone stands in for it
        backbone = tiny_backbone("qwen2_vl")
        settings["sft_output_dir"] = backbone
    else:
        assert "model_name_or_path" not in settings, f"{recipe}: a recipe of another family needs a tiny replica"
    return settings, backbone


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_trains_on_the_tiny_replica_of_its_family(recipe, tmp_path, tiny_backbone, monkeypatch):
    from mm_embed_trl import MultimodalEmbeddingModel

    example = next(e for prefix, e in EXAMPLES.items() if recipe.startswith(prefix))
    settings, backbone = _tiny_recipe(recipe, example, tmp_path, tiny_backbone)
    config = tmp_path / recipe
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{example}.py", "--config", str(config)])
    trainer, adapters = _run_example(example, monkeypatch)

    assert trainer.state.global_step == 2
    assert adapters == bool(settings.get("use_peft"))
    run = tmp_path / "run"
    model = MultimodalEmbeddingModel.from_pretrained(run)
    assert model.config.lora_config is None  # adapters merged into the saved model
    assert model.encode(["a red circle"]).isfinite().all()
    if backbone is not None and settings.get("use_peft"):
        # LoRA trained adapters only: the weights it leaves alone (the token embeddings) are the backbone's, while a
        # full fine-tuning run would have changed them.
        start = {k.split("embed_tokens.")[-1]: v for k, v in _weights(Path(backbone)).items() if "embed_tokens" in k}
        saved = {k.split("embed_tokens.")[-1]: v for k, v in _weights(run).items() if "embed_tokens" in k}
        assert start and start.keys() == saved.keys() and all((start[k] == saved[k]).all() for k in start)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in RECIPES if "tiny" in r])
def test_use_peft_is_honoured_on_the_built_in_tiny_backbone(recipe, tmp_path, tiny_backbone, monkeypatch):
    """`--use_peft true` without a model name: the examples passed no LoRA config for their built-in backbone, so the
    run silently fine-tuned every weight."""
    example = next(e for prefix, e in EXAMPLES.items() if recipe.startswith(prefix))
    settings, _ = _tiny_recipe(recipe, example, tmp_path, tiny_backbone)
    config = tmp_path / recipe
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{example}.py", "--config", str(config), "--use_peft", "true", "--lora_r", "4"])
    _, adapters = _run_example(example, monkeypatch, train=False)
    assert adapters


def _trains_adapters(trainer) -> bool:
    """Whether the run trains LoRA adapters and nothing else."""
    trained = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    return bool(trained) and all("lora_" in name for name in trained)


def _run_example(example: str, monkeypatch, *, train: bool = True):
    """Run the example's `main()` (it parses `sys.argv`; without `train`, up to the trainer it builds); returns that
    trainer and whether, as built, it trained LoRA adapters only (the final save merges them)."""
    module = _example(example)
    built = []
    tail = module.train_evaluate_save

    def keep_trainer(trainer, *args, **kwargs):
        built.append((trainer, _trains_adapters(trainer)))
        return tail(trainer, *args, **kwargs) if train else None

    monkeypatch.setattr(module, "train_evaluate_save", keep_trainer)
    module.main()
    return built[0]


def _weights(directory: Path) -> dict:
    weights = {}
    for file in directory.glob("*.safetensors"):
        weights.update(load_file(file))
    return weights
