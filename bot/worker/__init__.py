"""The generation worker: claims reply jobs in batches and answers them with one base model.

- `core.Worker`: the claim → prepare → generate → complete loop, leases, retries, shutdown;
- `prepare`: a job's history rendered into a `GenerationRequest`, with the persona's plugin hook;
- `adapters.AdapterSync`: the backend's LoRA adapters kept in step with the active versions in the store;
- `stream.ObserverFanout`: tokens from the generating thread to the reply observers on the event loop.
"""

from bot.worker.core import Worker, worker_id

__all__ = ["Worker", "worker_id"]
