"""Optional capabilities of adapters and backends are declared Protocols, checked with isinstance."""

from __future__ import annotations

import pytest

from adapters.base import AnswersLater, ChecksToken, Previews, StreamingAdapter
from adapters.console import ConsoleAdapter
from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from bot.config import VllmSettings
from bot.generation.base import Closeable, LocalMemory, RemoteBackend
from bot.generation.vllm import VllmBackend
from bot.streaming import StreamingRelay
from tests.fakes.backend import ScriptedBackend


def test_adapters_have_the_capabilities_they_declare() -> None:
    for adapter in (DiscordAdapter(None), TelegramAdapter("123:abc")):
        assert isinstance(adapter, StreamingAdapter)
        assert isinstance(adapter, AnswersLater) and isinstance(adapter, ChecksToken)
    console = ConsoleAdapter(interactive=False)
    assert not isinstance(console, Previews) and not isinstance(console, StreamingAdapter)


def test_streaming_needs_an_adapter_that_previews() -> None:
    with pytest.raises(TypeError, match="console adapter cannot stream"):
        StreamingRelay(ConsoleAdapter(interactive=False), streaming=True)
    assert StreamingRelay(ConsoleAdapter(interactive=False)).streaming is False


def test_backends_have_the_capabilities_they_declare() -> None:
    remote = VllmBackend(VllmSettings(urls=["http://127.0.0.1:9"]), ScriptedBackend().tokenizer)
    try:
        assert isinstance(remote, RemoteBackend) and isinstance(remote, Closeable)
        assert not isinstance(remote, LocalMemory)
    finally:
        remote.close()
    fake = ScriptedBackend()
    assert not isinstance(fake, RemoteBackend) and not isinstance(fake, LocalMemory)
