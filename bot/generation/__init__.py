"""Generation backends: one base model, many persona adapters."""

from bot.generation.base import GenerationBackend, GenerationRequest, GenerationResult

__all__ = ["GenerationBackend", "GenerationRequest", "GenerationResult"]
