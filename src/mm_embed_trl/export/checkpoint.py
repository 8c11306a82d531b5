"""Checkpoints an export reads: checks with clear errors, loading, and the output-folder rules (never over the
source, never over a non-empty folder unless asked)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: `import mm_embed_trl.export` must be cheap
    from ..modeling import MultimodalEmbeddingModel

logger = logging.getLogger(__name__)

__all__ = ["load_model_for_export"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


# ---------------------------------------------------------------------------------------------------- loading
def _is_published_model(name: str | os.PathLike) -> bool:
    """A published embedding model (a preset's hub id, or a local copy a preset recognises), exported as released."""
    from ..presets import CheckpointFacts, find_preset

    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file() or json.loads(config_file.read_text()).get("model_type") == "mm_embedding":
            return False
        return find_preset(CheckpointFacts.read(path))[0] is not None
    return not path.exists() and find_preset(CheckpointFacts(name=os.fspath(name)))[0] is not None


def _looks_like_weights(path: pathlib.Path) -> bool:
    return path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES)


def load_model_for_export(
    model_or_path: MultimodalEmbeddingModel | str | os.PathLike, **kwargs
) -> MultimodalEmbeddingModel:
    """Return the model to export: the instance itself, a saved ``MultimodalEmbeddingModel`` loaded from a directory,
    or a published embedding model (hub id or local copy) wrapped with its preset.

    Raises clear errors for a path that does not exist, is not a directory, holds no ``config.json`` or weights, is
    not a ``MultimodalEmbeddingModel`` (a plain backbone, a sentence-transformers export, ...) or has no processor.
    """
    from ..modeling import MultimodalEmbeddingModel

    if isinstance(model_or_path, MultimodalEmbeddingModel):
        model = model_or_path
    elif isinstance(model_or_path, (str, os.PathLike)) and _is_published_model(model_or_path):
        model = MultimodalEmbeddingModel.from_pretrained(model_or_path, **kwargs)  # wrapped with its preset
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = pathlib.Path(model_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Checkpoint {str(path)!r} does not exist. Pass the output_dir of a training run (or a directory "
                "written by MultimodalEmbeddingModel.save_pretrained)."
            )
        if not path.is_dir():
            raise NotADirectoryError(f"Checkpoint {str(path)!r} is a file; pass the directory that holds config.json.")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"{str(path)!r} is not a trained model: it has no config.json. Pass the output_dir of a training "
                "run (or of MultimodalEmbeddingModel.save_pretrained)."
            )
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(config_file)!r} is not valid JSON ({err}); the checkpoint is damaged.") from err
        if model_type != "mm_embedding":
            hint = (
                " It looks like a sentence-transformers export already (modules.json is present)."
                if (path / "modules.json").is_file()
                else " To export an untrained backbone as a baseline, wrap it first: "
                "`MultimodalEmbeddingModel.from_pretrained(path)` and pass that model instance."
            )
            raise ValueError(
                f"{str(path)!r} is not a trained MultimodalEmbeddingModel (config.json has model_type="
                f"{model_type!r}, expected 'mm_embedding').{hint}"
            )
        if not any(_looks_like_weights(p) for p in path.iterdir()):
            raise ValueError(
                f"{str(path)!r} has a config.json but no weights (*.safetensors); the save did not complete. "
                "Re-run save_pretrained / the end of training."
            )
        model = MultimodalEmbeddingModel.from_pretrained(path, **kwargs)
    else:
        raise TypeError(
            f"model_or_path must be a MultimodalEmbeddingModel or a directory path, got {type(model_or_path).__name__}."
        )
    if model.processor is None:
        where = f" at {str(model_or_path)!r}" if not isinstance(model_or_path, MultimodalEmbeddingModel) else ""
        raise ValueError(
            f"The model{where} has no processor (tokenizer / image processor files are missing), so its prompts "
            "cannot be exported. Save the base model's processor next to the weights "
            "(`AutoProcessor.from_pretrained(base).save_pretrained(dir)`) or call model.set_processor(...) first."
        )
    return model


def _refuse_overlap_with_source(source: str | os.PathLike, output_dir: pathlib.Path) -> None:
    """An export that is, contains or lies inside the checkpoint it reads would replace (delete) that checkpoint."""
    source_dir = pathlib.Path(source).expanduser().resolve()
    target = output_dir.resolve()
    if target == source_dir or target in source_dir.parents or source_dir in target.parents:
        raise ValueError(
            f"output_dir {str(output_dir)!r} overlaps the checkpoint being exported ({str(source_dir)!r}): writing "
            "the export there would replace the run it is made from. Choose an output_dir outside the checkpoint "
            "(e.g. a sibling such as <run>-st)."
        )


def _prepare_output_dir(output_dir: pathlib.Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {str(output_dir)!r} exists and is a file.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} is not empty; pass overwrite=True (CLI: --overwrite) or another directory."
        )
