"""`personabot worker`: only the generation worker, against the configured database.

Several workers (on one machine or many) can share one PostgreSQL: each claims its own batches with
`FOR UPDATE SKIP LOCKED`. SIGTERM or SIGINT stops it cleanly: the batch in flight finishes, or its
unfinished jobs go back to the queue, and it exits 0.
"""

from __future__ import annotations

import argparse

from bot.cli.common import run_async, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run only the generation worker (several may share one PostgreSQL)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: model.device, auto = CUDA when present)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default: model.dtype")
    p.add_argument(
        "--weights",
        choices=["auto", "float16", "int8", "int4"],
        help="CPU base weights (default: model.weights)",
    )
    p.add_argument("--max-batch", type=int, metavar="N", help="jobs per batch (default: worker.max_batch)")
    p.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="Prometheus port (default: worker.metrics_port)"
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: the cores other processes leave idle)",
    )
    p.set_defaults(func=_worker, default_log_level="INFO")


def _worker(args: argparse.Namespace) -> int:
    from bot.errors import ConfigError

    settings = settings_from(args)
    if args.device:
        settings.model.device = args.device
    if args.dtype:
        settings.model.dtype = args.dtype
    if args.weights:
        settings.model.weights = args.weights
    if args.max_batch is not None:
        if args.max_batch < 1:
            raise ConfigError("--max-batch must be at least 1")
        settings.worker.max_batch = args.max_batch
    if args.metrics_port is not None:
        settings.worker.metrics_port = args.metrics_port
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        import os

        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # also fixes the backend's adaptive count
        torch.set_num_threads(args.threads)
    from bot.worker.process import run_worker_process

    return run_async(run_worker_process(settings))
