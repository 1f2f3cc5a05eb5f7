"""Conversations to token ids: one renderer for training and for replies.

`ChatRenderer(tokenizer, template)` renders with the model's own chat template (`"model"`), the
tutorial's `"llama2"` or `"chatml"`. `render_prompt` fits a conversation to the context window and ends
it with the generation prompt (the worker); `render_training` gives ids and assistant-only labels (the
trainer). Special tokens are structure, never content: user and persona text is always tokenized as
plain text. A `PromptCache` per channel (`ChatRenderer.channel_cache(key)`) makes rendering incremental.
"""

from bot.prompting.errors import PromptError
from bot.prompting.history import read_history_file
from bot.prompting.renderer import TRUNCATION_MARKER, ChatRenderer, PromptCache
from bot.prompting.templates import TEMPLATE_NAMES
from bot.prompting.types import IGNORE_INDEX, RenderedPrompt, TrainingExample, Turn

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATE_NAMES",
    "TRUNCATION_MARKER",
    "ChatRenderer",
    "PromptCache",
    "PromptError",
    "RenderedPrompt",
    "TrainingExample",
    "Turn",
    "read_history_file",
]
