"""Moved to :mod:`mm_embed_trl.data.chat_template` (the export writes it and the model's loader reads it back);
importable from here as before."""

from ..data.chat_template import build_embedding_chat_template, recover_base_chat_template

__all__ = ["build_embedding_chat_template", "recover_base_chat_template"]
