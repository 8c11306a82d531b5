"""Tests for mm_embed_trl.demo.tiny: offline tiny backbones that load with the stock Auto classes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import runpy
import stat
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the Hub

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from numerics import TINY_FORWARD, TINY_IMAGE_FORWARD, assert_close, rounding_rtol  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from mm_embed_trl.demo import tiny  # noqa: E402
from mm_embed_trl.demo.tiny import TINY_FAMILIES, build_tiny_backbone, get_tiny_backbone, main  # noqa: E402

VLM_FAMILIES = tuple(f for f in TINY_FAMILIES if f != "text")
V = tiny._FORMAT_VERSION  # cache folders are named <family>-s<seed>-v<format version>
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Hand-checked expectations per family: (bare class, generative class, processor class).
EXPECTED_CLASSES = {
    "qwen2_vl": ("Qwen2VLModel", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLModel", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLModel", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "llava_onevision": ("LlavaOnevisionModel", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor"),
    "text": ("Qwen3Model", "Qwen3ForCausalLM", "Qwen2Tokenizer"),
}
# Image tokens for one 64x64 image, worked out by hand from the processor settings:
# Qwen2/2.5 (patch 14, factor 28): 64 -> round(64/28)*28 = 56 px -> 4x4 patches -> 2x2 merged = 4.
# Qwen3 (patch 16, factor 32): 64 px -> 4x4 patches -> 2x2 merged = 4.
# LLaVA-OV: base 16x16 crop (2x2 features) + one 16x16 anyres crop (2x2) + 2 row newlines = 10.
IMAGE_TOKENS_64 = {"qwen2_vl": 4, "qwen2_5_vl": 4, "qwen3_vl": 4, "llava_onevision": 10}
IMAGE_TOKEN = {f: "<|image_pad|>" for f in QWEN_FAMILIES} | {"llava_onevision": "<image>"}


def _image(width: int = 64, height: int = 64, colour=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def _messages(with_image: bool, text: str) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[pathlib.Path, str]:
    """Every family, built once through the CLI (`--family all`); returns (root, printed output)."""
    root = tmp_path_factory.mktemp("tiny_all")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--family", "all", "--output_dir", str(root)])
    return root, out.getvalue()


@pytest.fixture(scope="session")
def processors(built) -> dict:
    root, _ = built
    return {f: AutoProcessor.from_pretrained(root / f) for f in VLM_FAMILIES}


@pytest.fixture(scope="session")
def bare_models(built) -> dict:
    root, _ = built
    return {f: AutoModel.from_pretrained(root / f).eval() for f in TINY_FAMILIES}


# --- building and loading ----------------------------------------------------------------------------


def test_cli_all_prints_and_writes_every_family(built):
    root, printed = built
    assert sorted(p.name for p in root.iterdir()) == sorted(TINY_FAMILIES)
    # DeepSpeed, when the build is the first thing to import it, logs "[<date> ...] Setting ds_accelerator" to stdout
    lines = [line for line in printed.strip().splitlines() if not line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == list(TINY_FAMILIES)
    for family, line in zip(TINY_FAMILIES, lines):
        assert str(root / family) in line and "model.safetensors" in line
    # no temporary build directories left behind
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_directory_loads_with_auto_classes(built, bare_models, family):
    path = built[0] / family
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name
    assert not list(path.glob("*.bin")), "weights must be safetensors"
    bare_name, gen_name, proc_name = EXPECTED_CLASSES[family]

    bare = bare_models[family]
    assert type(bare).__name__ == bare_name
    gen_cls = AutoModelForCausalLM if family == "text" else AutoModelForImageTextToText
    gen, info = gen_cls.from_pretrained(path, output_loading_info=True)
    assert type(gen).__name__ == gen_name
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    _, bare_info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert not any(bare_info.values()), bare_info

    if family != "text":
        # The generative head wraps the same weights AutoModel loads.
        bare_sd, gen_sd = bare.state_dict(), gen.model.state_dict()
        assert bare_sd.keys() == gen_sd.keys()
        assert all(torch.equal(bare_sd[k], gen_sd[k]) for k in bare_sd)
        processor = AutoProcessor.from_pretrained(path)
        assert type(processor).__name__ == proc_name
        assert processor.tokenizer.padding_side == "left"

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    # UME-R1's reasoning tags: one ordinary token each (decoding without special tokens keeps them), saved as such
    trace = "<think>two shapes.</think><answer>a red circle</answer>"
    ids = tokenizer(trace, add_special_tokens=False)["input_ids"]
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert ids.count(tokenizer.convert_tokens_to_ids(tag)) == 1, tag
        assert tag not in tokenizer.all_special_tokens, tag
    assert tokenizer.decode(ids, skip_special_tokens=True) == trace

    # Sizes per STACK.md.
    text_cfg = gen.config.get_text_config()
    assert (text_cfg.hidden_size, text_cfg.num_hidden_layers) == (64, 2)
    assert (text_cfg.num_attention_heads, text_cfg.num_key_value_heads) == (4, 2)
    assert text_cfg.vocab_size == len(tokenizer) == gen.get_input_embeddings().weight.shape[0]
    assert 1000 <= len(tokenizer) <= 2000
    assert sum(p.numel() for p in gen.parameters()) < 1_000_000
    # Weights are actually random (not zeros / constants) and the LM head is tied to the embeddings.
    assert gen.get_input_embeddings().weight.std() > 1e-3
    assert torch.equal(gen.get_output_embeddings().weight, gen.get_input_embeddings().weight)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_config_token_ids_match_tokenizer(built, family):
    path = built[0] / family
    config = transformers.AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.convert_tokens_to_ids
    assert config.image_token_id == ids(IMAGE_TOKEN[family])
    if family in QWEN_FAMILIES:
        assert config.video_token_id == ids("<|video_pad|>")
        assert config.vision_start_token_id == ids("<|vision_start|>")
        assert config.vision_end_token_id == ids("<|vision_end|>")
        assert config.vision_config.depth == 2
    else:
        assert config.video_token_id == ids("<video>")
        assert config.vision_config.num_hidden_layers == 2
    # every special token is a single id, and a distinct one
    specials = list(tiny._QWEN_SPECIAL_TOKENS)
    if family == "llava_onevision":
        specials += tiny._LLAVA_SPECIAL_TOKENS
    special_ids = [ids(t) for t in specials]
    assert len(set(special_ids)) == len(specials) and tok.unk_token_id not in special_ids
    for token, token_id in zip(specials, special_ids):
        assert tok.encode(f"a{token}b", add_special_tokens=False).count(token_id) == 1


def test_pretokenize_regex_copy_matches_transformers():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert tiny._QWEN2_PRETOKENIZE_REGEX == PRETOKENIZE_REGEX


def test_tokenizer_roundtrips_any_text_and_knows_corpus_words(built):
    tok = AutoTokenizer.from_pretrained(built[0] / "qwen2_vl")
    for text in ("Ünïcødé 🙂 中文 tab\tnew\nline", "Zebra-42 xylophone!", "  leading spaces"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # corpus words are single tokens (the BPE was trained on them)
    pieces = tok.tokenize("Represent the given image with the following question: how many red circles?")
    assert pieces == [
        "Represent", "Ġthe", "Ġgiven", "Ġimage", "Ġwith", "Ġthe", "Ġfollowing", "Ġquestion", ":",
        "Ġhow", "Ġmany", "Ġred", "Ġcircles", "?",
    ]  # fmt: skip


# --- chat template and processor ---------------------------------------------------------------------


def test_qwen2_vl_chat_template_renders_like_qwen(processors):
    rendered = processors["qwen2_vl"].apply_chat_template(
        _messages(True, "Find a caption"), add_generation_prompt=True, tokenize=False
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find a caption<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # string content, explicit system turn, no generation prompt
    rendered = processors["qwen2_vl"].apply_chat_template(
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}], tokenize=False
    )
    assert rendered == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_qwen3_vl_and_llava_templates(processors):
    msgs = _messages(True, "caption")
    assert processors["qwen3_vl"].apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>caption<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processors["llava_onevision"].apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user <image>\ncaption<|im_end|>\n<|im_start|>assistant\n"
    )


def test_text_family_template_and_rejects_images(built):
    tok = AutoTokenizer.from_pretrained(built[0] / "text")
    rendered = tok.apply_chat_template(_messages(False, "hello"), add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(Exception, match="text-only"):
        tok.apply_chat_template(_messages(True, "hello"), tokenize=False)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_processor_image_token_count(processors, family):
    processor = processors[family]
    text = processor.apply_chat_template(_messages(True, "Represent the given image"), add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    enc = processor(text=[text], images=[_image()], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    n_image_tokens = int((enc["input_ids"] == image_id).sum())
    assert n_image_tokens == IMAGE_TOKENS_64[family]
    if family in QWEN_FAMILIES:
        # one pad per merged 2x2 patch group
        assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]
        assert n_image_tokens == int(enc["image_grid_thw"].prod()) // 4
        assert torch.equal(enc["mm_token_type_ids"], (enc["input_ids"] == image_id).long())


def test_any_image_is_resized_to_the_small_budget(processors):
    # 300x200 under Qwen2-VL's smart_resize with max 16 cells of 28 px (worked by hand):
    # beta = sqrt(300*200 / 12544) = 2.187; h = floor(200/2.187/28)*28 = 84, w = floor(300/2.187/28)*28 = 112
    # -> 6x8 patches -> 3x4 merged = 12 image tokens.
    enc = processors["qwen2_vl"].image_processor(images=[_image(300, 200)], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 6, 8]]
    for family in QWEN_FAMILIES:  # a large image never exceeds 16 tokens, a tiny one gets at least 4
        ip = processors[family].image_processor
        for w, h in ((1024, 768), (8, 8)):
            n_tokens = int(ip(images=[_image(w, h)], return_tensors="pt")["image_grid_thw"].prod()) // 4
            assert 4 <= n_tokens <= 16, (family, w, h, n_tokens)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_bare_model_forward_on_mixed_left_padded_batch(processors, bare_models, family):
    processor, model = processors[family], bare_models[family]
    texts = [
        processor.apply_chat_template(_messages(True, "Represent the given image"), add_generation_prompt=True,
                                      tokenize=False),
        processor.apply_chat_template(_messages(False, "a red circle"), add_generation_prompt=True, tokenize=False),
    ]  # fmt: skip
    enc = processor(text=texts, images=[_image()], return_tensors="pt", padding=True)
    if family in QWEN_FAMILIES:
        assert "mm_token_type_ids" in enc
    # Left padding: the shorter (text-only) row starts with pads, every row ends with a real token.
    assert enc["attention_mask"][:, -1].tolist() == [1, 1]
    assert enc["attention_mask"][1, 0] == 0 and enc["input_ids"][1, 0] == processor.tokenizer.pad_token_id
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape == (2, enc["input_ids"].shape[1], 64)
    assert torch.isfinite(hidden).all()
    # Reference: each row alone (no padding). The last-token state must not depend on batching/padding.
    with torch.no_grad():
        alone_img = model(**processor(text=texts[:1], images=[_image()], return_tensors="pt")).last_hidden_state
        alone_txt = model(**processor(text=texts[1:], return_tensors="pt")).last_hidden_state
    # unnormalised hidden states; padding changes the kernels' summation order only
    assert_close(hidden[0, -1], alone_img[0, -1], rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    assert_close(hidden[1, -1], alone_txt[0, -1], rtol=rounding_rtol(**TINY_FORWARD))
    # The image matters: a different picture changes the image row's last state.
    with torch.no_grad():
        other = model(**processor(text=texts[:1], images=[_image(colour=(0, 0, 255))], return_tensors="pt"))
    with pytest.raises(AssertionError):  # by more than rounding
        assert_close(other.last_hidden_state[0, -1], alone_img[0, -1], rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_text_family_forward(built, bare_models):
    path = built[0] / "text"
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a red circle on the left", "hi"], return_tensors="pt", padding=True)
    assert enc["attention_mask"][:, -1].tolist() == [1, 1] and enc["attention_mask"][1, 0] == 0
    with torch.no_grad():
        hidden = bare_models["text"](**enc).last_hidden_state
        logits = AutoModelForCausalLM.from_pretrained(path)(**enc).logits
    assert hidden.shape == (2, enc["input_ids"].shape[1], 64)
    assert logits.shape == (2, enc["input_ids"].shape[1], len(tok))


# --- determinism ---------------------------------------------------------------------------------------


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_identical_files_and_other_seed_differs(built, tmp_path):
    again = build_tiny_backbone("qwen2_vl", tmp_path / "again", seed=0)
    reference = built[0] / "qwen2_vl"
    for name in sorted(p.name for p in reference.iterdir()):
        assert _sha(again / name) == _sha(reference / name), name

    other = build_tiny_backbone("qwen2_vl", tmp_path / "other", seed=1)
    from safetensors.torch import load_file

    w0, w1 = load_file(reference / "model.safetensors"), load_file(other / "model.safetensors")
    assert w0.keys() == w1.keys()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert _sha(other / "tokenizer.json") == _sha(reference / "tokenizer.json")  # tokenizer is seed-free


def test_build_leaves_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_backbone("text", tmp_path / "t")
    assert torch.equal(torch.rand(3), expected)


# --- atomic writes, overwrite, errors ------------------------------------------------------------------


def test_unknown_family_raises(tmp_path):
    for call in (lambda: build_tiny_backbone("gpt9", tmp_path / "x"), lambda: get_tiny_backbone("gpt9")):
        with pytest.raises(ValueError, match="gpt9") as err:
            call()
        assert all(f in str(err.value) for f in TINY_FAMILIES)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["--family", "gpt9", "--output_dir", str(tmp_path / "y")])


def test_refuses_non_empty_dir_unless_overwrite(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_backbone("text", target)
    assert (target / "keep.txt").exists()
    build_tiny_backbone("text", target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    # an existing *empty* directory is fine without overwrite
    (tmp_path / "empty").mkdir()
    assert (build_tiny_backbone("text", tmp_path / "empty") / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "t"]  # no temp dirs left


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(family, directory, seed):
        (directory / "config.json").write_text("{}")  # a partial write...
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_write_backbone", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_backbone("text", tmp_path / "t")
    with pytest.raises(RuntimeError, match="disk full"):
        get_tiny_backbone("text", cache_dir=str(tmp_path / "cache"))
    # ...never becomes visible, and the temp dirs are gone
    assert not (tmp_path / "t").exists()
    assert list((tmp_path / "cache").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# --- cache -------------------------------------------------------------------------------------------


def test_get_tiny_backbone_builds_once(tmp_path, monkeypatch):
    calls = []
    real = tiny._write_backbone
    monkeypatch.setattr(tiny, "_write_backbone", lambda *a: (calls.append(a[0]), real(*a))[1])
    cache = tmp_path / "cache"
    first = get_tiny_backbone("text", seed=3, cache_dir=str(cache))
    assert first == cache.absolute() / f"text-s3-v{V}"
    assert calls == ["text"] and (first / "model.safetensors").is_file()
    assert stat.S_IMODE(first.stat().st_mode) == 0o755  # readable by others (mkdtemp alone gives 0o700)
    assert get_tiny_backbone("text", seed=3, cache_dir=str(cache)) == first
    assert calls == ["text"]  # second call: no rebuild
    assert get_tiny_backbone("text", seed=4, cache_dir=str(cache)) == cache.absolute() / f"text-s4-v{V}"
    assert calls == ["text", "text"]


def test_get_tiny_backbone_default_cache_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_EMBED_TRL_CACHE", str(tmp_path / "env"))
    path = get_tiny_backbone("text")
    assert path == (tmp_path / "env" / "tiny" / f"text-s0-v{V}").absolute() and (path / "config.json").is_file()


def test_get_tiny_backbone_loser_of_race_uses_winner(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    target = cache / f"text-s0-v{V}"
    real = tiny._write_backbone

    winner_inode = []

    def build_while_another_process_wins(family, directory, seed):
        real(family, directory, seed)
        winner = cache / "winner-tmp"  # the "other process" builds too and renames in first
        winner.mkdir()
        real(family, winner, seed)
        os.rename(winner, target)
        winner_inode.append((target / "model.safetensors").stat().st_ino)

    monkeypatch.setattr(tiny, "_write_backbone", build_while_another_process_wins)
    path = get_tiny_backbone("text", cache_dir=str(cache))
    assert path == target.absolute() and (path / tiny._MARKER_FILE).is_file()
    assert [p.name for p in cache.iterdir()] == [f"text-s0-v{V}"]  # loser's temp copy removed
    assert [(path / "model.safetensors").stat().st_ino] == winner_inode  # the winner's files were kept


def test_get_tiny_backbone_rejects_foreign_directory(tmp_path):
    target = tmp_path / f"text-s0-v{V}"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="Delete it"):
        get_tiny_backbone("text", cache_dir=str(tmp_path))


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-executing an imported module
def test_module_main_entry_point(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tiny", "--family", "text", "--output_dir", str(tmp_path / "t"), "--seed", "2"])
    runpy.run_module("mm_embed_trl.demo.tiny", run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("text: wrote ") and "seed 2" in out
    assert (tmp_path / "t" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_racing_for_the_cache(tmp_path):
    code = (
        "from mm_embed_trl.demo.tiny import get_tiny_backbone as g; import sys; "
        "print(g('text', cache_dir=sys.argv[1]))"
    )
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(tiny.__file__).parents[2]), HF_HUB_OFFLINE="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True)
        for _ in range(2)
    ]
    # the path is the last stdout line (libraries imported along the way may log to stdout, e.g. deepspeed)
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tmp_path.absolute() / f"text-s0-v{V}")
    assert [p.name for p in tmp_path.iterdir()] == [f"text-s0-v{V}"]
    # Determinism across processes (the BPE trainer and the weight init must not depend on hash seeds).
    here = build_tiny_backbone("text", tmp_path.parent / f"{tmp_path.name}-inproc")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(here / name) == _sha(tmp_path / f"text-s0-v{V}" / name), name
