"""The retrain job's training subprocess: `personabot train` on the bundled dialogues plus an export.

    python -m bot.scheduler.train_job [--config FILE] PERSONA --data EXPORT.jsonl --version NAME

It runs the trainer (`trainer.run.train`) exactly as `personabot train PERSONA --version NAME` does,
with the export as an extra dialogue file read after the persona's own (`extra_dialogues`), so the
held-out split, the mask audit and the manifest's dataset hash cover both. The version is registered,
not activated: the retrain job activates it only after comparing it with the active version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bot.config import Settings


def train_with_export(
    settings: Settings,
    slug: str,
    data: Path,
    version: str,
    *,
    max_steps: int | None = None,
    device: str | None = None,
) -> None:
    from trainer.run import TrainRequest, train

    overrides = {"max_steps": max_steps} if max_steps is not None else {}
    train(
        settings,
        TrainRequest(
            persona=slug,
            overrides=overrides,
            version=version,
            device=device,
            progress=False,
            extra_dialogues=[data.resolve()],
        ),
    )


def main(argv: list[str] | None = None) -> int:
    from bot.cli.common import settings_from
    from bot.errors import PersonabotError
    from bot.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m bot.scheduler.train_job")
    parser.add_argument("--config")
    parser.add_argument("persona")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    try:
        if not args.data.is_file():
            raise PersonabotError(f"--data {args.data}: no such file")
        train_with_export(
            settings_from(args),
            args.persona,
            args.data,
            args.version,
            max_steps=args.max_steps,
            device=args.device,
        )
    except PersonabotError as exc:
        print(f"personabot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
