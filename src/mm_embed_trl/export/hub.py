"""Publish an exported model to the Hugging Face Hub, after checking that it is complete and safe to share.

:func:`push_to_hub` refuses, *before any network call that writes*, a folder that is not an exported embedding model
(no ``config.json``, no ``*.safetensors`` weights, missing tokenizer or image-processor files, a sentence-transformers
export without ``modules.json`` / ``config_sentence_transformers.json`` or with a missing module folder), pickled
weights (``*.bin`` / ``*.pt`` / ...), and a missing or rejected token. The upload itself is one
``HfApi.upload_folder`` call, i.e. one commit: either the whole model lands or nothing does.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExportCheck", "check_repo_id", "push_to_hub", "validate_export_dir"]

logger = logging.getLogger(__name__)

# Pickle formats: never uploaded as weights.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Training state a Trainer leaves in its output_dir: not needed for inference, so skipped (not refused).
_TRAINING_STATE_PATTERNS = (
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "checkpoint-*",
    "runs",
    ".*",
    "__pycache__",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "image_processor_config.json")
DEFAULT_COMMIT_MESSAGE = "Upload multimodal embedding model (mm-embed-trl)"


@dataclass
class ExportCheck:
    """What :func:`validate_export_dir` found.

    Attributes:
        kind: ``"sentence-transformers"`` (loads with ``SentenceTransformer``) or ``"mm-embedding"`` (a
            ``MultimodalEmbeddingModel`` directory, optionally with a ``sentence_transformers/`` export inside).
        files: paths (relative, POSIX) that will be uploaded.
        skipped: training-state paths left out of the upload.
        warnings: non-fatal findings (e.g. no README.md model card).
    """

    kind: str
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _is_skipped(rel: str) -> bool:
    parts = rel.split("/")
    return any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in _TRAINING_STATE_PATTERNS)


def _load_json(path: pathlib.Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{what} {str(path)!r} is not valid JSON ({err}); the export is damaged. Re-export it."
        ) from err


def _check_model_dir(root: pathlib.Path, rel_dir: str, config: dict) -> None:
    """Weights (safetensors, complete shards), tokenizer and, for vision-language models, image-processor files."""
    where = root / rel_dir if rel_dir else root
    label = f"{str(where)!r}"
    safetensors = sorted(p.name for p in where.glob("*.safetensors"))
    index = where / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_load_json(index, "Weight index").get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (where / s).is_file())
        if missing:
            raise ValueError(f"{label} is missing weight shards {missing} listed in model.safetensors.index.json.")
    if not safetensors:
        raise ValueError(
            f"{label} has no *.safetensors weights. Export with mm_embed_trl.export (or save_pretrained with "
            "safe_serialization=True) before pushing."
        )
    if not any((where / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{label} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}). Save the processor next to the "
            "weights: `processor.save_pretrained(dir)`."
        )
    text_model = config.get("encoder_config", config)
    is_vision_language = isinstance(text_model, dict) and text_model.get("vision_config") is not None
    if is_vision_language and not any((where / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
        raise ValueError(
            f"{label} holds a vision-language model but no image processor "
            f"({' / '.join(_IMAGE_PROCESSOR_FILES[:2])}); without it images cannot be embedded. Save the processor: "
            "`processor.save_pretrained(dir)`."
        )


def _check_sentence_transformers(root: pathlib.Path, rel_dir: str) -> None:
    where = root / rel_dir if rel_dir else root
    label = f"{str(where)!r}"
    if not (where / "config_sentence_transformers.json").is_file():
        raise ValueError(
            f"{label} has modules.json but no config_sentence_transformers.json (prompts, similarity): the "
            "sentence-transformers export is incomplete. Re-run export_sentence_transformers."
        )
    modules = _load_json(where / "modules.json", "modules.json")
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{label}/modules.json lists no modules; re-run export_sentence_transformers.")
    for entry in modules:
        path = where / entry.get("path", "")
        if not path.is_dir():
            raise ValueError(f"{label}: module {entry.get('name')!r} points to missing folder {entry.get('path')!r}.")
        class_ref = str(entry.get("type", ""))
        if not class_ref.startswith("sentence_transformers."):
            module_file = class_ref.rsplit(".", 1)[0] + ".py"
            if not ((where / module_file).is_file() or (path / module_file).is_file()):
                raise ValueError(
                    f"{label}: module {class_ref!r} is custom code but {module_file} is not in the export, so it "
                    "could not load even with trust_remote_code=True."
                )


def validate_export_dir(local_dir: str | os.PathLike) -> ExportCheck:
    """Check that ``local_dir`` is a complete, safe-to-share export; raise a clear error otherwise.

    Accepted: a sentence-transformers export (``modules.json``) or a ``MultimodalEmbeddingModel`` directory
    (``model_type: mm_embedding``), each with ``config.json``, ``*.safetensors`` weights and processor files.
    Pickled files are refused, except the training state a Trainer leaves behind (``training_args.bin``,
    ``optimizer.pt``, ``checkpoint-*/``...), which is skipped.
    """
    root = pathlib.Path(local_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Nothing to push: {str(root)!r} does not exist. Export the model first.")
    if not root.is_dir():
        raise NotADirectoryError(f"Nothing to push: {str(root)!r} is a file; pass the exported model directory.")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{str(root)!r} is not an exported model (no config.json). Pass the directory written by "
            "export_sentence_transformers / save_model_for_inference (e.g. examples/export.py --output_dir)."
        )
    config = _load_json(config_file, "config.json")
    check = ExportCheck(kind="")
    pickles = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if _is_skipped(rel):
            check.skipped.append(rel)
        elif path.suffix in _PICKLE_SUFFIXES:
            pickles.append(rel)
        else:
            check.files.append(rel)
    if pickles:
        raise ValueError(
            f"{str(root)!r} holds pickled files {pickles}; weights must be safetensors (pickles can run code when "
            "loaded). Re-save with safe_serialization=True (mm_embed_trl.export writes safetensors) and delete them."
        )
    if (root / "modules.json").is_file():
        check.kind = "sentence-transformers"
        _check_sentence_transformers(root, "")
        _check_model_dir(root, "", config)
    elif config.get("model_type") == "mm_embedding":
        check.kind = "mm-embedding"
        _check_model_dir(root, "", config)
        sub = root / "sentence_transformers"
        if (sub / "modules.json").is_file():
            _check_sentence_transformers(root, "sentence_transformers")
            _check_model_dir(root, "sentence_transformers", _load_json(sub / "config.json", "config.json"))
    else:
        raise ValueError(
            f"{str(root)!r} is not an exported embedding model: it has neither modules.json (sentence-transformers "
            f"export) nor a MultimodalEmbeddingModel config (model_type={config.get('model_type')!r}). Export it "
            "with `python examples/export.py --checkpoint RUN_DIR --output_dir EXPORT_DIR` first."
        )
    if not (root / "README.md").is_file():
        check.warnings.append("no README.md model card; the Hub page will be empty (export writes one).")
    return check


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()  # HF_TOKEN, then the token saved by `hf auth login`
    if not token:
        raise PermissionError(
            "No Hugging Face token: pass token=... (CLI: --hub_token), set the HF_TOKEN environment variable or "
            "run `hf auth login`. A token with write access is needed to push."
        )
    return token


def _point_card_at_repo(root: pathlib.Path, repo_id: str) -> None:
    """Rewrite the model card's usage snippets, which name the local export path, to name ``repo_id``."""
    readme = root / "README.md"
    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    new = text
    references = {str(root.absolute()), str(root.resolve())}
    info_file = root / "mm_embed_trl_export.json"
    if info_file.is_file():
        recorded = _load_json(info_file, "Export info").get("card_model_reference")
        if recorded and recorded != repo_id:
            references.add(str(recorded))  # the folder may have been moved since the export
    for local in references:
        new = new.replace(f'"{local}"', f'"{repo_id}"')
    if new != text:
        readme.write_text(new, encoding="utf-8")
        logger.info("Pointed the model card's usage snippets at %s", repo_id)


def check_repo_id(repo_id: Any) -> None:
    """Raise a clear ValueError for a Hub repo id that no upload could use (checked before any work is done)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError("repo_id must be a non-empty string such as 'my-org/my-embedding-model'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid repo_id {repo_id!r}: {err}") from err


def push_to_hub(
    local_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Validate ``local_dir`` and upload it to ``repo_id`` in one commit; return the repo (or pull request) URL.

    Order: folder checks (:func:`validate_export_dir`) → token (argument, ``HF_TOKEN`` or saved login) →
    ``HfApi.whoami`` (token accepted) → ``create_repo(exist_ok=True)`` → (``create_branch`` for a new ``revision``)
    → one ``upload_folder`` commit. Any failure before ``create_repo`` raises without writing anything to the Hub.
    The model card's usage snippets, which name the local path, are rewritten to name ``repo_id`` first.

    Args:
        local_dir: the export (a sentence-transformers directory, or a final save: ``save_model_for_inference``,
            ``trainer.save_for_inference``).
        repo_id: ``"org/name"`` or ``"name"`` (in the token owner's namespace).
        token: a write token; defaults to ``HF_TOKEN`` / the saved login.
        private: create the repo private (``None``: the Hub default); ignored if the repo exists.
        commit_message: message of the upload commit.
        revision: branch to push to (created from ``main`` if missing).
        create_pr: open a pull request instead of committing to the branch.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    root = pathlib.Path(local_dir).expanduser()
    check = validate_export_dir(root)
    for warning in check.warnings:
        logger.warning("%s: %s", root, warning)
    token = _resolve_token(token)
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except Exception as err:  # invalid token, offline mode, no network: all mean "cannot push"
        raise PermissionError(
            f"The Hugging Face Hub did not accept the token ({type(err).__name__}: {err}). Check the token (write "
            "access), HF_HUB_OFFLINE and the network; nothing was uploaded."
        ) from err
    logger.info("Pushing %s (%s, %d files) to %s as %s", root, check.kind, len(check.files), repo_id, user.get("name"))
    _point_card_at_repo(root, repo_id)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(root),
        repo_type="model",
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        allow_patterns=check.files,  # exactly the files validated above (training state and pickles stay home)
    )
    if create_pr and getattr(commit, "pr_url", None):
        return str(commit.pr_url)
    return str(getattr(repo_url, "url", None) or repo_url)
