"""Offline demo fixtures: tiny random backbones (:mod:`.tiny`), the generated "shapes" image-text dataset
(:mod:`.generated`), real handwritten digits with captions and reasoning targets (:mod:`.digits`, scikit-learn's
scans) and the generated text corpus for stage-1 distillation (:mod:`.text_corpus`).

They stand in for checkpoints and datasets that cannot be downloaded (tests, CI, the examples' CPU demo); the
library itself never needs them.
"""
