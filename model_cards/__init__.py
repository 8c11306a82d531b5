"""Model card templates (shipped inside the package as `mm_embed_trl.model_cards`)."""
