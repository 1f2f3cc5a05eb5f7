"""personabot runtime: config, events, store, prompting, worker, scheduler and CLI."""

__version__ = "0.1.0"
