"""The papers the trainers implement, in TRL's `_paper` shape (`title`, `id` = arXiv id, `citation` = BibTeX) plus
the method family's `name` and the paper's `url`. A trainer sets its `_paper` to one of these; TRL's own
`create_model_card` reads `title`, `id` and `citation`, the embedding model card all five."""

from __future__ import annotations

__all__ = ["UME_R1_PAPER", "UNIME_PAPER"]

UNIME_PAPER = {
    "name": "UniME",
    "title": "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs",
    "id": "2504.17432",
    "url": "https://arxiv.org/abs/2504.17432",
    "citation": (
        "@article{gu2025unime,\n"
        "  title   = {Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs},\n"
        "  author  = {Gu, Tiancheng and Yang, Kaicheng and Feng, Ziyong and Wang, Xingjun and Zhang, Yanzhao and\n"
        "             Long, Dingkun and Chen, Yingda and Cai, Weidong and Deng, Jiankang},\n"
        "  journal = {arXiv preprint arXiv:2504.17432},\n"
        "  year    = {2025}\n"
        "}"
    ),
}

UME_R1_PAPER = {
    "name": "UME-R1",
    "title": "UME-R1: Exploring Reasoning-Driven Generative Multimodal Embeddings",
    "id": "2511.00405",
    "url": "https://arxiv.org/abs/2511.00405",
    "citation": (
        "@article{lan2025umer1,\n"
        "  title   = {UME-R1: Exploring Reasoning-Driven Generative Multimodal Embeddings},\n"
        "  author  = {Lan, Zhibin and Niu, Liqiang and Meng, Fandong and Zhou, Jie and Su, Jinsong},\n"
        "  journal = {arXiv preprint arXiv:2511.00405},\n"
        "  year    = {2025}\n"
        "}"
    ),
}
