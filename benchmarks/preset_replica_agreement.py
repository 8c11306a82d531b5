"""How close each preset's `encode` comes to its authors' encode path on the tiny replicas (the docs/PRESETS.md table).

    PYTHONPATH=src python benchmarks/preset_replica_agreement.py

Runs exactly the comparisons of tests/test_presets.py (same replicas, ports, inputs; query side, plus the query
instruction where the model takes one and UME-R1's generative embedding) and prints, per preset, the tolerance the
test derives and the largest normwise error reached: max |ours - theirs| / max |theirs| over the batch.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))


def _forced(cases, tokens) -> dict:
    from transformers import LogitsProcessorList

    return {"logits_processor": LogitsProcessorList([cases._ForcedCompletion(tokens)]), "max_new_tokens": 8}


def main() -> None:
    import reference_encoders as ref
    import test_presets as cases
    import torch
    from preset_replicas import build_replica

    from mm_embed_trl import MultimodalEmbeddingModel

    torch.set_num_threads(1)
    root = pathlib.Path(tempfile.mkdtemp(prefix="preset-replicas-"))
    print(f"{'preset':<20} {'inputs':<24} {'tolerance (rtol)':>16} {'reached':>10}")
    for preset, (port, kinds) in sorted(cases.REFERENCES.items()):
        path = str(build_replica(preset, root))
        inputs = cases._inputs(preset, kinds)
        model = MultimodalEmbeddingModel.from_pretrained(path, dtype=torch.float32)
        expected = port(path, inputs)
        errors = [(cases._ours(model, inputs) - expected).abs().max() / expected.abs().max()]
        if preset in ("gme-qwen2vl", "qwen3-vl-embedding"):
            with_instruction = port(path, inputs, instruction=cases.INSTRUCTION)
            ours = cases._ours(model, inputs, instruction=cases.INSTRUCTION)
            errors.append((ours - with_instruction).abs().max() / with_instruction.abs().max())
        print(f"{preset:<20} {', '.join(kinds):<24} {cases.RTOL:>16.1e} {float(max(errors)):>10.1e}")
        if preset == "ume-r1":  # the generative embedding, on the forced completion of the test
            tokens = model.processor.tokenizer.convert_tokens_to_ids(
                ["<think>", "</think>", "<answer>", "<gen_emb>", "<|im_end|>"]
            )
            expected = ref.ume_r1_gen_encode(path, inputs, **_forced(cases, tokens))
            ours = cases._ours(model, inputs, mode="generative", generation_kwargs=_forced(cases, tokens))
            error = float((ours - expected).abs().max() / expected.abs().max())
            print(f"{'ume-r1 (generative)':<20} {', '.join(kinds):<24} {cases.RTOL:>16.1e} {error:>10.1e}")
    print(f"(float32 throughout; {root} holds the replicas)")


if __name__ == "__main__":
    main()
