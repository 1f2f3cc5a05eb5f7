"""Reading a `POST /v1/chat/completions` body: what it asks for, or one OpenAI-style 400 naming the field.

Fields OpenAI defines but personabot cannot honour are accepted only at their neutral value (so
clients such as SillyTavern, which send `presence_penalty: 0`, work); any other value, and any field
OpenAI does not define, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bot.config import ServeSettings
from bot.generation.options import MAX_STOP_CHARS, MAX_STOPS
from bot.serve.conversation import ChatMessage
from bot.serve.errors import ApiError

# OpenAI fields accepted only at these values (None: absent or null).
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "prediction": (None,),
    "audio": (None,),
    "web_search_options": (None,),
    "metadata": (None, {}),
    "min_p": (None, 0, 0.0),  # sent by SillyTavern and vLLM-style clients
    "top_a": (None, 0, 0.0),
}
_KNOWN = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "user",
    "store",
    *_NEUTRAL,
}
CONVERSATION_HEADER = "X-Conversation-Id"
MAX_CONVERSATION_CHARS = 100


@dataclass
class ChatRequest:
    model: str  # as the client named it
    persona: str
    version: str | None  # `slug@version` pins one
    messages: list[ChatMessage]
    instruction: str | None
    stream: bool
    store: bool
    conversation: str
    options: dict[str, Any] = field(default_factory=dict)


def bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(f"`{name}` must be a number from {low:g} to {high:g}; got {value!r}.", name)
    return float(value)


def _text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of text parts (other parts are not supported)."""
    if isinstance(content, str):
        return content
    param = f"messages[{index}].content"
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"Only text content is supported; {param} has a {kind!r} part.", param)
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad(f"`{param}` must be a string or a list of text parts.", param)


def _messages(raw: Any, limits: ServeSettings) -> tuple[list[ChatMessage], str | None]:
    if not isinstance(raw, list) or not raw:
        raise bad("`messages` must be a non-empty list.", "messages")
    if len(raw) > limits.max_messages:
        raise bad(
            f"Too many messages: {len(raw)}, at most {limits.max_messages} (serve.max_messages).",
            "messages",
            "context_length_exceeded",
        )
    turns: list[ChatMessage] = []
    system: list[str] = []
    total = 0
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad(f"`messages[{index}]` must be an object.", f"messages[{index}]")
        role = message.get("role")
        if message.get("tool_calls") or message.get("function_call"):
            raise bad("Tool calls are not supported.", f"messages[{index}].tool_calls")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(
                f"`messages[{index}].role` {role!r} is not supported (system, developer, user, assistant).",
                f"messages[{index}].role",
            )
        text = _text(message.get("content"), index)
        total += len(text)
        if role in ("system", "developer"):
            system.append(text)
        else:
            turns.append(ChatMessage(role, text))
    if total > limits.max_request_chars:
        raise bad(
            f"The messages are too long: {total} characters, at most {limits.max_request_chars} "
            "(serve.max_request_chars).",
            "messages",
            "context_length_exceeded",
        )
    if not turns or turns[-1].role != "user":
        raise bad("The last message (other than system ones) must be the user's.", "messages")
    instruction = "\n\n".join(t for t in system if t.strip()) or None
    return turns, instruction


def _stops(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise bad(
            f"`stop` must be a string or a list of at most {MAX_STOPS} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters.",
            "stop",
        )
    return stops


def _conversation(body: dict[str, Any], header: str | None) -> str:
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("`user` must be a string.", "user")
    chosen = (header or user or "default").strip()
    if len(chosen) > MAX_CONVERSATION_CHARS or not chosen.isprintable():
        where = CONVERSATION_HEADER if header else "user"
        raise bad(
            f"The conversation id ({where}) must be printable, at most {MAX_CONVERSATION_CHARS} characters.",
            "user",
        )
    return chosen


def parse(body: Any, limits: ServeSettings, conversation_header: str | None) -> ChatRequest:
    """The request, or ApiError 400 naming the first field at fault."""
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", None)
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    for name, allowed in _NEUTRAL.items():
        if body.get(name) not in allowed:
            raise bad(
                f"`{name}` is not supported (only {allowed[1:] or 'null'!r}).", name, "unsupported_parameter"
            )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("`model` must be a persona slug, or slug@version.", "model")
    persona, _, version = model.partition("@")
    messages, instruction = _messages(body.get("messages"), limits)
    options: dict[str, Any] = {}
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = _number(body, name, low, high)
        if value is not None:
            options[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise bad("`top_k` must be a non-negative integer (0: off).", "top_k")
        options["top_k"] = top_k
    penalty = _number(body, "repetition_penalty", 0.5, 2.0)
    if penalty is not None:
        options["repetition_penalty"] = penalty
    if options.get("top_p") == 0.0:
        raise bad("`top_p` must be greater than 0.", "top_p")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"`{name}` must be a positive integer; got {value!r}.", name)
            options["max_tokens"] = value
    stops = _stops(body.get("stop"))
    if stops:
        options["stop"] = stops
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise bad("`seed` must be a non-negative integer.", "seed")
        options["seed"] = seed
    if version:
        options["version"] = version
    for name in ("stream", "store"):
        if body.get(name) is not None and not isinstance(body.get(name), bool):
            raise bad(f"`{name}` must be true or false.", name)
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise bad("`stream_options` supports only include_usage.", "stream_options")
        if stream_options.get("include_usage"):
            raise bad(
                "`stream_options.include_usage` is not supported.", "stream_options", "unsupported_parameter"
            )
    store = body.get("store") is not False
    return ChatRequest(
        model=model,
        persona=persona,
        version=version or None,
        messages=messages,
        instruction=instruction,
        stream=bool(body.get("stream")),
        store=store,
        conversation=_conversation(body, conversation_header) if store else "",
        options=options,
    )
