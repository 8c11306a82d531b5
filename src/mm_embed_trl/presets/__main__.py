"""``python -m mm_embed_trl.presets --list | --show NAME | --detect ID_OR_DIR``: the published models' presets."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from . import CheckpointFacts, available_presets, find_preset, get_preset


def _describe(preset) -> str:
    pooling = preset.pooling + (f" {preset.pooling_token}" if preset.pooling_token else "")
    if preset.generative_pooling_token:
        pooling += f"; generative {preset.generative_pooling_token}"
    return pooling


def format_table() -> str:
    """One line per preset: name, backbone family, prompt template, pooling, hub ids."""
    rows = [("preset", "family", "template", "pooling", "hub ids")]
    for preset in available_presets():
        name = preset.name + ("" if preset.verified else " (assumed)")
        rows.append((name, preset.model_type, preset.prompt_template, _describe(preset), ", ".join(preset.hub_ids)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in rows
    )


def format_preset(name: str) -> str:
    preset = get_preset(name)
    lines = [f"{preset.name}: {preset.title}"]
    for field in dataclasses.fields(preset):
        if field.name not in ("name", "title"):
            lines.append(f"  {field.name}: {getattr(preset, field.name)!r}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mm_embed_trl.presets",
        description="Presets of published multimodal embedding models (docs/PRESETS.md).",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="list every preset")
    group.add_argument("--show", metavar="NAME", help="every setting of one preset (name or hub id)")
    group.add_argument("--detect", metavar="ID_OR_DIR", help="which preset a hub id or local checkpoint gets, and why")
    args = parser.parse_args(argv)
    if args.list:
        print(format_table())
    elif args.show:
        print(format_preset(args.show))
    else:
        preset, reason = find_preset(CheckpointFacts.read(args.detect))
        print(f"{args.detect}: " + (f"preset {preset.name!r} ({preset.title}), by {reason}" if preset else "no preset"))


if __name__ == "__main__":
    main()
