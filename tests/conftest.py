"""Shared fixtures: tiny offline backbones and the generated shapes data, built once per test session."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed JIT-compiles its CPU communication op on first use, into one folder per user by default: test runs of
# two checkouts (two virtual environments) rebuilt it under each other's feet and their ZeRO launches hung on the
# half-built op. One folder per environment; subprocess launches inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Tiny models on a 2-core box: a second intra-op thread mostly adds contention (steps 10x slower when another
# process is busy), so tests use one. Multi-process tests get one per process from torchrun anyway.
# MM_EMBED_TRL_TEST_THREADS changes it: CI re-runs the numerics-sensitive files with 2 threads and other kernels
# (see the Makefile's test-numerics), so that results depending on the reduction order show up there.
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MM_EMBED_TRL_TEST_THREADS", "1")))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Everything the library caches (tiny backbones, generated data) goes to one per-session folder; subprocess
    tests inherit it through the environment."""
    if "MM_EMBED_TRL_CACHE" not in os.environ:
        os.environ["MM_EMBED_TRL_CACHE"] = str(tmp_path_factory.mktemp("mm_embed_trl_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_backbone(_session_cache):
    """tiny_backbone(family) -> path of a tiny random backbone directory (built once per session)."""
    from mm_embed_trl.demo.tiny import get_tiny_backbone

    return lambda family="qwen2_vl": str(get_tiny_backbone(family))


@pytest.fixture(scope="session")
def shapes_data(_session_cache):
    from mm_embed_trl.demo.generated import make_shapes_dataset

    return make_shapes_dataset(num_train=256, num_eval=64, seed=0, num_negatives=2)


@pytest.fixture(scope="session")
def qwen2_vl_model(tiny_backbone):
    from mm_embed_trl.modeling import MultimodalEmbeddingModel

    return MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))


@pytest.fixture(scope="session")
def instruct_generation_config():
    """instruct_generation_config(tokenizer) -> what Qwen2-VL-Instruct ships as generation_config.json (two EOS ids,
    sampling defaults that make sampling greedy: top_k=1, top_p=0.001, temperature=0.01), on the tiny backbone's
    ids."""
    from transformers import GenerationConfig

    def build(tokenizer):
        return GenerationConfig(
            do_sample=True, top_k=1, top_p=0.001, temperature=0.01, repetition_penalty=1.05,
            bos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        )

    return build


@pytest.fixture(scope="session")
def generation_settings():
    """generation_settings(model) -> the backbone's generation config as saved, without the transformers version."""

    def read(model) -> dict:
        settings = model.backbone.generation_config.to_diff_dict()
        settings.pop("transformers_version", None)
        return settings

    return read


@pytest.fixture(scope="session")
def preset_replica(_session_cache, tmp_path_factory):
    """preset_replica(preset, folder=None) -> path of the tiny random replica of that preset's published checkpoint
    (tests/preset_replicas.py), in a folder named as its Hub repository unless ``folder`` says otherwise."""
    from preset_replicas import build_replica

    root = tmp_path_factory.mktemp("preset_replicas")
    built = {}

    def get(preset: str, folder: str | None = None) -> str:
        if (preset, folder) not in built:
            built[preset, folder] = str(build_replica(preset, root, folder=folder))
        return built[preset, folder]

    return get
