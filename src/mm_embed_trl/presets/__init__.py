"""Published multimodal embedding models as first-class starting points: a preset per release says how its authors'
code embeds (prompt format, instruction placement, pixel budget, pooling, normalisation, tokens), and
``MultimodalEmbeddingModel.from_pretrained(<hub id or local copy>)`` applies it, so ``encode`` reproduces their vectors.

* found by hub id, by the repository's name (a local copy made with ``hf download --local-dir .../<name>``) or by a
  fingerprint of the checkpoint (its backbone family with the release's own tokens or files);
* every option stays overridable: keyword arguments of ``from_pretrained`` win over the preset's, ``preset=`` picks
  one by name and ``preset=None`` wraps a plain backbone;
* saved with the model (``config.preset``, its options in the config, the pixel budget in the processor) and shown in
  its model card;
* listed by ``python -m mm_embed_trl.presets --list`` (``--show NAME``, ``--detect ID_OR_DIR``).

docs/PRESETS.md: the per-model table with the authors' file:line for each setting and each replica test's tolerance.
"""

from . import catalog as _catalog  # noqa: F401  (registers the published models)
from . import registry as _registry
from .registry import *  # noqa: F403  (the public API is the registry's)

__all__ = list(_registry.__all__)
