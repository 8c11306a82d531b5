"""docs/ADDING_A_METHOD.md, run: its `# my_method.py` blocks become a temporary module whose method registers itself,
is found through the registry and trains two steps, so the guide cannot drift from the code."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from scripts import load_script

from mm_embed_trl import MultimodalEmbeddingModel
from mm_embed_trl.trainers.identity import method_keys, trainer_for_method
from mm_embed_trl.trainers.registry import method_table, method_trainers, register_method, unregister_method

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "ADDING_A_METHOD.md"
MODULE = "my_method_from_the_guide"


@pytest.fixture
def guide_method(tmp_path):
    """The guide's module, imported from a temporary file; its method forgotten afterwards."""
    blocks = re.findall(r"```python\n(# my_method\.py\n.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) == 3, "the guide's loss, config and trainer blocks start with '# my_method.py'"
    path = tmp_path / f"{MODULE}.py"
    path.write_text("\n".join(blocks))
    try:
        yield load_script(path, register=True)
    finally:
        module = sys.modules.get(MODULE)  # registered before it ran: its trainer may have registered, then failed
        unregister_method(module.WeightedInfoNCETrainer.method_key if hasattr(module, "WeightedInfoNCETrainer") else "")
        sys.modules.pop(MODULE, None)


def test_the_guides_method_registers_and_trains_two_steps_through_the_registry(
    guide_method, tiny_backbone, shapes_data, tmp_path
):
    import mm_embed_trl

    trainer_cls = trainer_for_method("weighted")  # an alias, as `--method weighted`
    assert trainer_cls is guide_method.WeightedInfoNCETrainer
    assert "weighted_infonce" in method_keys() and trainer_cls in method_trainers()
    assert mm_embed_trl.WeightedInfoNCETrainer is trainer_cls  # the package's exports read the registry
    assert mm_embed_trl.WeightedInfoNCEConfig is trainer_cls.config_class
    assert "`WeightedInfoNCETrainer`" in method_table()

    rows = shapes_data["train"].select(range(16))
    rows = rows.add_column("pair_weight", [float(1 + i % 3) for i in range(len(rows))])
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = trainer_cls.config_class(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", image_root=str(shapes_data.image_root),
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=rows)
    batch = trainer.data_collator([rows[i] for i in range(4)])
    assert batch["pair_weight"].tolist() == [1.0, 2.0, 3.0, 1.0]  # the named column, handed through
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) and h["mean_weight"] > 1.0 for h in logged)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


def test_a_method_key_belongs_to_one_class(guide_method):
    other = type("Impostor", (), {"method_key": "weighted_infonce", "__module__": "elsewhere"})
    with pytest.raises(ValueError, match="already registered by my_method_from_the_guide.WeightedInfoNCETrainer"):
        register_method(other)


def test_a_row_without_the_methods_column_is_named(guide_method, tiny_backbone, shapes_data, tmp_path):
    rows = shapes_data["train"].select(range(8))
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    args = guide_method.WeightedInfoNCEConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8,
                                              report_to="none", use_cpu=True, image_root=str(shapes_data.image_root))
    trainer = guide_method.WeightedInfoNCETrainer(model=model, args=args, train_dataset=rows)
    with pytest.raises(KeyError, match="no value in column 'pair_weight'"):
        trainer.data_collator([rows[0]])
