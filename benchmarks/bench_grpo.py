"""Cost of UME-R1's RL step on top of TRL (CPU): EmbeddingGRPOTrainer against a stock `trl.GRPOTrainer`.

    PYTHONPATH=src python benchmarks/bench_grpo.py [--width 256] [--steps 8] [--repeats 3] [--generate]

Both trainers get the same policy (the tiny Qwen2-VL with UME-R1's tokens, widened with --width), the same prompts
(each pair's two sides in UME-R1's prompt, text and image rows), the same G, completion length, loss and optimizer,
beta = 0 (no reference forward in either). The stock trainer scores with a trivial reward (completion length); the
embedding trainer adds what UME-R1 needs: the no-grad embedding forward of every rollout, the all-rank gather and the
retrieval + format rewards. By default generation is replaced in both by the same fixed completions (35 tokens, as
the generated reasoning targets), so the figure is the trainer's own overhead; --generate samples for real (then
completion lengths, hence times, differ between the two runs).

Reported: median seconds per optimizer step over alternating repeats (after one warm-up step), their ratio (goal
<= 1.10), and the share of the embedding trainer's step spent in the rollout-embedding forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

G = 4
ROWS = 32  # per step: 4 pairs x 2 sides x G


def _policy(width):
    import torch
    from bench_hardneg import _backbone_path

    from mm_embed_trl import MultimodalEmbeddingModel

    os.environ["BENCH_WIDTH"] = str(width)
    torch.manual_seed(0)
    return MultimodalEmbeddingModel.from_pretrained(_backbone_path(), encoder_kind="generative")


def _common_args(output_dir, steps):
    return dict(
        output_dir=output_dir, num_generations=G, per_device_train_batch_size=ROWS, max_completion_length=48,
        max_steps=steps + 1, beta=0.0, loss_type="dr_grpo", learning_rate=1e-5, logging_steps=1000, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
    )


def _fixed_completions(trainer):
    from mm_embed_trl.data.reasoning import format_reasoning

    tok = trainer.processing_class.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    words = ["red", "blue", "green", "dark", "light", "small", "large", "round"]

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        out = []
        for i, ids in enumerate(prompt_ids):
            word = words[(sum(ids) + i) % len(words)]
            text = format_reasoning("The image shows one shape.", f"a {word} cross at the top")
            out.append(tok(text, add_special_tokens=False)["input_ids"] + [end])
        return out, None

    trainer._generate_single_turn = generate


class _StepTimer:
    """Wall time of each optimizer step (callback)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.start)

        self.times: list[float] = []
        self.callback = Callback()


def run_embedding_trainer(width, data, steps, generate):
    from mm_embed_trl import EmbeddingGRPOConfig, EmbeddingGRPOTrainer

    timer = _StepTimer()
    args = EmbeddingGRPOConfig(**_common_args("/tmp/bench-grpo-emb", steps), image_root=str(data.image_root),
                               reasoning_sensitivity_rows=0, overwrite_output_dir=True)
    trainer = EmbeddingGRPOTrainer(model=_policy(width), args=args, train_dataset=data["train"],
                                   callbacks=[timer.callback])
    if not generate:
        _fixed_completions(trainer)
    embed_time = []
    # the retrieval reward function's embedding forward (its prompts' processor call included)
    reward = trainer.reward_funcs[trainer._retrieval_column]
    original = reward.embed_rollouts

    def timed(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        embed_time.append(time.perf_counter() - start)
        return out

    reward.embed_rollouts = timed
    trainer.train()
    return timer.times[1:], embed_time[1:]


def run_stock_trainer(width, data, steps, generate):
    from trl import GRPOConfig, GRPOTrainer

    from mm_embed_trl.data.images import load_image
    from mm_embed_trl.data.samplers import flatten_pairs
    from mm_embed_trl.data.schema import EmbeddingInput
    from mm_embed_trl.data.templates import get_template
    from mm_embed_trl.trainers.sft_trainer import prepare_embedding_tokens

    model = _policy(width)
    processor = model.processor
    prepare_embedding_tokens(model, processor)
    processor.tokenizer.padding_side = "left"
    template = get_template("ume_r1")
    rows = flatten_pairs(data["train"])

    def prompt(row):  # the same prompts EmbeddingGRPOTrainer builds
        image = load_image(row["image"], str(data.image_root)) if row["image"] else None
        messages = template.build_messages(EmbeddingInput(text=row["text"], image=image), row["side"])
        return {"prompt": messages, "images": [image] if image is not None else []}

    rows = rows.map(prompt, remove_columns=rows.column_names)

    def length_reward(completions, **kwargs):  # trivial
        return [float(len(str(c))) / 100 for c in completions]

    class MixedBatchGRPOTrainer(GRPOTrainer):
        """Stock, but for TRL 1.16's mixed text/image batch bug that EmbeddingGRPOTrainer fixes the same way: a
        text-only prompt's images are None, which the processor's second call rejects; it takes []."""

        def _tokenize_prompts(self, prompts):
            prompt_ids, images, fields = super()._tokenize_prompts(prompts)
            if images is not None:
                images = [found if found is not None else [] for found in images]
            return prompt_ids, images, fields

    timer = _StepTimer()
    trainer = MixedBatchGRPOTrainer(model=model.backbone, reward_funcs=[length_reward],
                          args=GRPOConfig(**_common_args("/tmp/bench-grpo-stock", steps), shuffle_dataset=False),
                          train_dataset=rows, processing_class=processor, callbacks=[timer.callback])
    if not generate:
        _fixed_completions(trainer)
    trainer.train()
    return timer.times[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generate", action="store_true", help="sample completions instead of fixed ones")
    opts = parser.parse_args()

    import torch

    from mm_embed_trl.demo.generated import make_shapes_dataset

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = make_shapes_dataset(num_train=ROWS // (2 * G) * (opts.steps + 1), num_eval=8)
    stock, emb, share = [], [], []
    for _ in range(opts.repeats):  # alternating, so drifts in machine load hit both
        stock.append(statistics.median(run_stock_trainer(opts.width, data, opts.steps, opts.generate)))
        times, embed = run_embedding_trainer(opts.width, data, opts.steps, opts.generate)
        emb.append(statistics.median(times))
        share.append(sum(embed) / sum(times))
    s, e = statistics.median(stock), statistics.median(emb)
    print(f"width {opts.width}, {ROWS} rollouts/step (G={G}), completions {'sampled' if opts.generate else 'fixed'}")
    print(f"stock GRPOTrainer step      {s * 1000:8.1f} ms  (repeats: {', '.join(f'{t * 1000:.0f}' for t in stock)})")
    print(f"EmbeddingGRPOTrainer step   {e * 1000:8.1f} ms  (repeats: {', '.join(f'{t * 1000:.0f}' for t in emb)})")
    spread = f"min {min(emb) / max(stock):.3f}, max {max(emb) / min(stock):.3f}"
    print(f"ratio                       {e / s:8.3f}  ({spread})")
    print(f"embedding forward share     {statistics.median(share):8.1%}")


if __name__ == "__main__":
    main()
