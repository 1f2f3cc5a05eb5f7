"""Conversations to token ids: one renderer for training and for replies.

See `renderer.ChatRenderer`. Special tokens are structure, never content: user and persona text is
always tokenized as plain text.
"""

from bot.prompting.renderer import ChatRenderer, RenderedPrompt, Turn

__all__ = ["ChatRenderer", "RenderedPrompt", "Turn"]
