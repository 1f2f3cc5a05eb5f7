"""Shipping a trained version with its persona: `python -m trainer.bundle PERSONA VERSION`.

Copies `<data_dir>/loras/<persona>/<version>/` into `personas/<persona>/adapter/` (`personas.bundled`)
with the LoRA weights in float16 (half the size; the worker casts them to the model's dtype on load),
then measures the held-out loss of the float16 files on the training run's own held-out split and
records it in the manifest as `heldout_loss_after` (the float32 run's value stays as
`heldout_loss_after_fp32`). The shipped-adapter test reproduces that number.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bot.config import Settings

BUNDLED_VERSION_PREFIX = "bundled-"


def bundle(settings: Settings, slug: str, version: str, dest: Path | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from bot.runtime import load_registry
    from bot.scheduler.evaluate import heldout_losses
    from personas.bundled import BUNDLED_FOLDER
    from personas.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_dir, read_manifest, write_manifest

    source = adapter_dir(settings, slug, version)
    manifest = read_manifest(source)
    persona = load_registry(settings).get(slug)
    dest = dest or persona.folder / BUNDLED_FOLDER
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    weights = {k: v.to(torch.float16).contiguous() for k, v in load_file(source / ADAPTER_WEIGHTS).items()}
    save_file(weights, dest / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    shutil.copy2(source / ADAPTER_CONFIG, dest / ADAPTER_CONFIG)
    [loss] = heldout_losses(settings, slug, None, [dest])
    metrics = dict(manifest.metrics)
    metrics["heldout_loss_after_fp32"] = metrics.get("heldout_loss_after")
    metrics["heldout_loss_after"] = loss
    shipped = manifest.model_copy(
        update={"version": BUNDLED_VERSION_PREFIX + version, "metrics": metrics, "files": {}}
    )
    write_manifest(dest, shipped)
    return dest


def main(argv: list[str] | None = None) -> int:
    from bot.cli.common import settings_from

    parser = argparse.ArgumentParser(prog="python -m trainer.bundle", description=__doc__.split("\n")[0])
    parser.add_argument("--config")
    parser.add_argument("persona")
    parser.add_argument("version")
    parser.add_argument("--dest", type=Path, help="default: the persona's own adapter/ folder")
    args = parser.parse_args(argv)
    dest = bundle(settings_from(args), args.persona, args.version, args.dest)
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(f"wrote {dest} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
