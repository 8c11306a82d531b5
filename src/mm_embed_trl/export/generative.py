"""Export UME-R1's *generative* embedding as a sentence-transformers model (custom module, ``trust_remote_code``).

The discriminative embedding exports remote-code-free (:func:`~mm_embed_trl.export.export_sentence_transformers`):
the state at ``<disc_emb>`` depends only on the prompt. The generative one needs ``generate`` inside the model, which
no stock sentence-transformers module does, so this export is one custom input module
(``mm_embed_generative.MMEmbedGenerativeEncoder``, its source saved at the model root) around the saved
``MultimodalEmbeddingModel``::

    st = SentenceTransformer(path, trust_remote_code=True)   # needs `pip install mm-embed-trl`
    st.encode_query(x) == model.encode(x, side="query", mode="generative", **generation)
    st.encode_document(x) == model.encode(x, side="document", mode="generative", **generation)
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

__all__ = ["GENERATIVE_MODULE_FILE", "export_generative_sentence_transformers"]

GENERATIVE_MODULE_FILE = "mm_embed_generative.py"
_MODULE_SOURCE = pathlib.Path(__file__).with_name("st_generative_module.py")


def export_generative_sentence_transformers(
    model_or_path,
    output_dir: str | os.PathLike,
    *,
    generation: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a sentence-transformers directory that embeds with ``model.encode(mode="generative")``.

    Args:
        model_or_path: a UME-R1 ``MultimodalEmbeddingModel`` (``config.generative_pooling_token`` set, a generative
            backbone) or the directory of a saved one. LoRA adapters are merged into the saved copy.
        output_dir: the export directory (written to a staging sibling, then renamed into place).
        generation: ``encode`` options saved with the export (``max_new_tokens``, ``do_sample``, ...; greedy with
            up to UME-R1's 8192 new tokens by default).
        overwrite: replace a non-empty ``output_dir``.
    """
    import copy

    from .._files import publish_dir, staged_dir
    from ..modeling.generative import UME_R1_MAX_NEW_TOKENS
    from .checkpoint import _prepare_output_dir, _refuse_overlap_with_source, load_model_for_export

    output_dir = pathlib.Path(output_dir).expanduser().absolute()
    if not hasattr(model_or_path, "config"):
        _refuse_overlap_with_source(model_or_path, output_dir)
    _prepare_output_dir(output_dir, overwrite)
    model = load_model_for_export(model_or_path)
    if model.config.generative_pooling_token is None or model.lm_head is None:
        raise ValueError(
            "This model has no generative embedding to export (config.generative_pooling_token unset or no LM head): "
            "train it with EmbeddingSFTTrainer / EmbeddingGRPOTrainer, or export the discriminative embedding with "
            "export_sentence_transformers."
        )
    settings = {"max_new_tokens": UME_R1_MAX_NEW_TOKENS, **dict(generation or {})}
    with staged_dir(output_dir, what="the generative sentence-transformers export") as staging:
        final = staging / "export"
        final.mkdir()
        saved = copy.deepcopy(model) if model.has_lora else model
        saved.merge_lora()
        saved.save_pretrained(final / "mm_embedding", safe_serialization=True)
        shutil.copyfile(_MODULE_SOURCE, final / GENERATIVE_MODULE_FILE)
        (final / "mm_embed_generative_config.json").write_text(json.dumps({"generation": settings}, indent=2) + "\n")
        modules = [{"idx": 0, "name": "0", "path": "", "type": "mm_embed_generative.MMEmbedGenerativeEncoder"}]
        (final / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        st_config = {
            "model_type": "SentenceTransformer",
            "prompts": {"query": "", "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        }
        (final / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2) + "\n")
        info = {"format": "mm_embed_trl.sentence_transformers.generative", "generation": settings,
                "requires": "trust_remote_code=True and mm-embed-trl installed"}
        (final / "mm_embed_trl_export.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        publish_dir(final, output_dir)
    return output_dir
