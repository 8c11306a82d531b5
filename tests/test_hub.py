"""Hub publishing, offline: HfApi.whoami / create_repo / create_branch / upload_folder are patched and recorded.

Refusals must happen before any Hub call that writes (no create_repo, no upload_folder), and a successful push is
one upload_folder commit of exactly the validated files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
from scripts import load_script

from mm_embed_trl.export import export_sentence_transformers, push_to_hub, save_model_for_inference, validate_export_dir
from mm_embed_trl.modeling import MultimodalEmbeddingModel

REPO = "my-org/tiny-embedder"
ROOT = Path(__file__).resolve().parents[1]


class HubRecorder:
    """Stands in for the Hub: records calls, returns what the real HfApi returns."""

    def __init__(self, monkeypatch, *, whoami_error: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        recorder = self

        def whoami(api, token=None, **kwargs):
            recorder.calls.append(("whoami", {"token": api.token}))
            if whoami_error is not None:
                raise whoami_error
            return {"name": "me", "type": "user"}

        def create_repo(api, repo_id, **kwargs):
            recorder.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kwargs):
            recorder.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(api, **kwargs):
            recorder.calls.append(("upload_folder", kwargs))
            root = Path(kwargs["folder_path"])
            # snapshot what would be uploaded (the real client filters with the same allow_patterns)
            files = huggingface_hub.utils.filter_repo_objects(
                [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()],
                allow_patterns=kwargs.get("allow_patterns"),
                ignore_patterns=kwargs.get("ignore_patterns"),
            )
            recorder.uploaded = {f: (root / f).read_bytes() for f in files}
            pr = "https://huggingface.co/my-org/tiny-embedder/discussions/1" if kwargs.get("create_pr") else None
            return huggingface_hub.CommitInfo(
                commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123",
                commit_message=kwargs.get("commit_message") or "",
                commit_description="",
                oid="abc123",
                pr_url=pr,
            )

        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", whoami)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def wrote_nothing(self) -> bool:
        return not {"create_repo", "create_branch", "upload_folder"} & set(self.names())


@pytest.fixture(scope="module")
def st_export(tiny_backbone, tmp_path_factory) -> Path:
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    return export_sentence_transformers(model, tmp_path_factory.mktemp("hub") / "export")


@pytest.fixture
def export_copy(st_export, tmp_path) -> Path:
    """A fresh copy per test (push rewrites the card; broken variants are made from it)."""
    return Path(shutil.copytree(st_export, tmp_path / "export"))


@pytest.fixture(autouse=True)
def _no_real_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


def test_push_uploads_the_validated_export_in_one_commit(export_copy, monkeypatch):
    hub = HubRecorder(monkeypatch)
    url = push_to_hub(export_copy, REPO, token="hf_test", private=True, commit_message="Add model")
    assert url == f"https://huggingface.co/{REPO}"
    assert hub.names() == ["whoami", "create_repo", "upload_folder"]
    create = hub.calls[1][1]
    assert create["repo_id"] == REPO and create["exist_ok"] is True and create["private"] is True
    upload = hub.calls[2][1]
    assert upload["repo_id"] == REPO and upload["commit_message"] == "Add model" and upload["create_pr"] is False
    assert Path(upload["folder_path"]) == export_copy
    expected = sorted(p.relative_to(export_copy).as_posix() for p in export_copy.rglob("*") if p.is_file())
    assert sorted(hub.uploaded) == expected
    for needed in (
        "config.json",
        "model.safetensors",
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "1_Pooling/config.json",
        "README.md",
    ):
        assert needed in hub.uploaded, needed
    assert not [f for f in hub.uploaded if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    # the card's snippets now name the repo instead of the local folder
    card = hub.uploaded["README.md"].decode()
    assert f'SentenceTransformer("{REPO}")' in card and str(export_copy) not in card


def test_push_to_branch_and_as_pull_request(export_copy, monkeypatch):
    hub = HubRecorder(monkeypatch)
    push_to_hub(export_copy, REPO, token="hf_test", revision="v2")
    assert hub.names() == ["whoami", "create_repo", "create_branch", "upload_folder"]
    assert hub.calls[2][1]["branch"] == "v2" and hub.calls[3][1]["revision"] == "v2"
    hub = HubRecorder(monkeypatch)
    url = push_to_hub(export_copy, REPO, token="hf_test", create_pr=True)
    assert url.endswith("/discussions/1") and hub.names() == ["whoami", "create_repo", "upload_folder"]


def test_token_from_environment(export_copy, monkeypatch):
    monkeypatch.undo()  # restore huggingface_hub.get_token for this test
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    hub = HubRecorder(monkeypatch)
    push_to_hub(export_copy, REPO)
    assert hub.calls[0] == ("whoami", {"token": "hf_from_env"})


def test_missing_token_fails_before_any_call(export_copy, monkeypatch):
    hub = HubRecorder(monkeypatch)
    with pytest.raises(PermissionError, match=r"No Hugging Face token.*HF_TOKEN"):
        push_to_hub(export_copy, REPO)
    assert hub.calls == []


def test_rejected_token_fails_before_any_write(export_copy, monkeypatch):
    hub = HubRecorder(monkeypatch, whoami_error=OSError("401 Invalid user token"))
    with pytest.raises(PermissionError, match=r"did not accept the token.*nothing was uploaded"):
        push_to_hub(export_copy, REPO, token="hf_bad")
    assert hub.names() == ["whoami"] and hub.wrote_nothing()


def _broken(export_copy: Path, kind: str) -> Path:
    if kind == "no_config":
        (export_copy / "config.json").unlink()
    elif kind == "no_weights":
        (export_copy / "model.safetensors").unlink()
    elif kind == "pickle_weights":
        (export_copy / "model.safetensors").rename(export_copy / "pytorch_model.bin")
    elif kind == "no_processor":
        (export_copy / "processor_config.json").unlink()
    elif kind == "no_tokenizer":
        (export_copy / "tokenizer.json").unlink()
        (export_copy / "tokenizer_config.json").unlink()
    elif kind == "no_st_config":
        (export_copy / "config_sentence_transformers.json").unlink()
    elif kind == "missing_module":
        shutil.rmtree(export_copy / "1_Pooling")
    elif kind == "custom_code":
        modules = json.loads((export_copy / "modules.json").read_text())
        modules[1]["type"] = "my_pooling.MyPooling"
        (export_copy / "modules.json").write_text(json.dumps(modules))
    elif kind == "plain_backbone":
        for name in ("modules.json", "config_sentence_transformers.json"):
            (export_copy / name).unlink()
    return export_copy


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("no_config", ValueError, "not an exported model \\(no config.json\\)"),
        ("no_weights", ValueError, "no \\*.safetensors weights"),
        ("pickle_weights", ValueError, "pickled files \\['pytorch_model.bin'\\].*safetensors"),
        ("no_processor", ValueError, "no image processor"),
        ("no_tokenizer", ValueError, "no tokenizer files"),
        ("no_st_config", ValueError, "no config_sentence_transformers.json"),
        ("missing_module", ValueError, "missing folder '1_Pooling'"),
        ("custom_code", ValueError, "my_pooling.py is not in the export"),
        ("plain_backbone", ValueError, "not an exported embedding model"),
    ],
)
def test_invalid_folders_are_refused_before_any_call(kind, error, message, export_copy, monkeypatch):
    hub = HubRecorder(monkeypatch)
    folder = _broken(export_copy, kind)
    with pytest.raises(error, match=message):
        push_to_hub(folder, REPO, token="hf_test")
    assert hub.calls == []  # not even whoami


def test_missing_folder_and_bad_repo_id(tmp_path, export_copy, monkeypatch):
    hub = HubRecorder(monkeypatch)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "nope", REPO, token="hf_test")
    with pytest.raises(ValueError, match="Invalid repo_id"):
        push_to_hub(export_copy, "not a/valid/repo", token="hf_test")
    assert hub.calls == []


def test_training_state_is_skipped_not_uploaded(tiny_backbone, tmp_path, monkeypatch):
    """A run directory from save_model_for_inference (+ Trainer leftovers) is a valid 'mm-embedding' push."""
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text"))
    run = tmp_path / "run"
    save_model_for_inference(model, run)
    (run / "training_args.bin").write_bytes(b"pickle")
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-10" / "optimizer.pt").write_bytes(b"pickle")
    check = validate_export_dir(run)
    assert check.kind == "mm-embedding"
    assert set(check.skipped) == {"training_args.bin", "checkpoint-10/optimizer.pt"}
    hub = HubRecorder(monkeypatch)
    push_to_hub(run, REPO, token="hf_test")
    assert "training_args.bin" not in hub.uploaded and not any(f.startswith("checkpoint-") for f in hub.uploaded)
    assert {"config.json", "model.safetensors", "sentence_transformers/modules.json"} <= set(hub.uploaded)
    card = hub.uploaded["README.md"].decode()
    assert f'MultimodalEmbeddingModel.from_pretrained("{REPO}")' in card
    assert f'model_dir = "{REPO}"' in card and 'subfolder="sentence_transformers"' in card
    assert str(run) not in card


def _load_cli():
    return load_script("examples/export.py", "mm_embed_trl_export_cli", register=True)


def test_cli_exports_and_pushes(tiny_backbone, tmp_path, monkeypatch):
    checkpoint = tmp_path / "run"
    MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl")).save_pretrained(checkpoint)
    report = {"before": {"heldout_recall@1": 0.125}, "after": {"heldout_recall@1": 0.75}}
    (checkpoint / "retrieval_report.json").write_text(json.dumps(report))
    hub = HubRecorder(monkeypatch)
    cli = _load_cli()
    out = cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--output_dir",
            str(tmp_path / "export"),
            "--prompt_query",
            "Query: ",
            "--push_to_hub",
            "--hub_model_id",
            REPO,
            "--hub_token",
            "hf_test",
            "--license",
            "apache-2.0",
            "--method",
            "hardneg",
            "--dataset_name",
            "TIGER-Lab/MMEB-train",
        ]
    )
    assert hub.names() == ["whoami", "create_repo", "upload_folder"]
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]["query"] == "Query: "
    card = hub.uploaded["README.md"].decode()
    assert "license: apache-2.0" in card and "0.125" in card and "0.75" in card and "+0.625" in card
    assert "arXiv:2504.17432" in card and f'SentenceTransformer("{REPO}")' in card


def test_cli_refuses_push_without_repo_id_and_bad_checkpoint(tmp_path, monkeypatch):
    hub = HubRecorder(monkeypatch)
    cli = _load_cli()
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(tmp_path), "--output_dir", str(tmp_path / "x"), "--push_to_hub"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["--checkpoint", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "x")])
    assert hub.calls == []


def test_a_bad_hub_model_id_is_refused_before_any_work(tiny_backbone, tmp_path, monkeypatch, capsys):
    """It used to be checked only when pushing: after a whole training run, or after the export (whose card then
    named the bad id) was written."""
    import runpy

    from mm_embed_trl import HardNegContrastiveConfig

    bad = "not a/valid/repo"
    with pytest.raises(ValueError, match=f"Invalid repo_id '{bad}'"):
        HardNegContrastiveConfig(output_dir=str(tmp_path / "run"), push_to_hub=True, hub_model_id=bad, report_to="none")
    # the training example fails while parsing its arguments, before loading any model or data
    example = load_script("examples/train_hardneg.py")
    argv = ["train_hardneg.py", "--output_dir", str(tmp_path / "run"), "--push_to_hub", "--hub_model_id", bad]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ValueError, match="Invalid repo_id"):
        example.main()
    assert not (tmp_path / "run").exists()
    # the export CLI: one line, exit 2, nothing exported
    checkpoint = tmp_path / "checkpoint"
    MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text")).save_pretrained(checkpoint)
    hub = HubRecorder(monkeypatch)
    script = ROOT / "examples" / "export.py"
    argv = [str(script), "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "export"), "--push_to_hub",
            "--hub_model_id", bad, "--hub_token", "hf_test"]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Invalid repo_id"), err
    assert not (tmp_path / "export").exists() and hub.calls == []
