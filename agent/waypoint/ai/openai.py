"""OpenAI-compatible request bodies: what a request asks for, and the body a backend gets.

`parse_request` reads a chat completions, completions or embeddings body once (the shell
has buffered it: the model name decides the route, so it must be read before forwarding)
and returns a `ModelRequest`. `ModelRequest.upstream_body` gives the bytes to send to one
backend: the original bytes when nothing changes, otherwise the body with

- the model renamed (a backend's `modelName`, a cost rule's or a fallback's model);
- `stream_options.include_usage: true` added to a stream that did not ask for usage, so
  the waypoint can count its tokens. The response reader (usage.py) then removes what the
  client did not ask for: the final usage chunk and the `"usage": null` members.

The token estimate (`prompt_tokens`): about 4 characters per token, rounded up (OpenAI's rule
of thumb for English), plus one token per id when the prompt is given as token ids. It only
serves admission (what a request reserves against a token limit) and cost rules; the charge
is always the backend's own `usage`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from agent.waypoint.codec.headers import Headers

Operation = Literal["chat", "completions", "embeddings"]

# Path suffixes, so that a prefix (/openai/v1/..., /v1/...) still names the operation.
_OPERATIONS: tuple[tuple[str, Operation], ...] = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/embeddings", "embeddings"),
)
MODEL_HEADER = b"x-weft-model"
TIER_HEADER = b"x-weft-tier"
CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text


def operation_of(method: str, path: str) -> Operation | None:
    """The OpenAI operation of a request, or None for anything else (GET /v1/models...)."""
    if method != "POST":
        return None
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, op in _OPERATIONS:
        if path.endswith(suffix):
            return op
    return None


class BadModelRequest(Exception):
    """A body the backend would refuse anyway; answered by the waypoint with 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class ModelRequest:
    operation: Operation
    body: dict[str, Any]
    raw: bytes
    model: str | None  # the model asked for: the body's, else the model header's
    model_from: Literal["body", "header", "none"]
    stream: bool
    include_usage: bool  # the client asked for usage in its stream
    max_tokens: int | None  # max_completion_tokens, else max_tokens
    temperature: float | None
    prompt_chars: int
    prompt_tokens: int  # the estimate (module docstring)
    tier: str | None

    @property
    def deterministic(self) -> bool:
        """Same request, same answer: embeddings always, generation at temperature 0."""
        return self.operation == "embeddings" or self.temperature == 0

    def needs_usage_injection(self) -> bool:
        return self.stream and not self.include_usage and self.operation != "embeddings"

    def upstream_body(self, model: str | None = None) -> tuple[bytes, bool]:
        """(the body for a backend, whether the reader must strip the injected usage).

        `model`: the name this backend should see; None keeps the request's. A stream that
        did not ask for usage is made to ask for it."""
        inject = self.needs_usage_injection()
        rename = model is not None and model != self.body.get("model")
        if not inject and not rename:
            return self.raw, False
        body = dict(self.body)
        if rename:
            body["model"] = model
        if inject:
            opts = body.get("stream_options")
            body["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
        out = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        return out, inject


def _text_len(content: Any) -> tuple[int, int]:
    """(characters, exact tokens) of a prompt, a message content or an embeddings input."""
    if isinstance(content, str):
        return len(content), 0
    if isinstance(content, list):
        if content and all(isinstance(x, int) for x in content):
            return 0, len(content)  # token ids
        chars = tokens = 0
        for part in content:
            if isinstance(part, dict):  # chat content parts: only text counts
                text = part.get("text")
                if isinstance(text, str):
                    chars += len(text)
            else:
                c, t = _text_len(part)
                chars += c
                tokens += t
        return chars, tokens
    return 0, 0


def prompt_size(op: Operation, body: dict[str, Any]) -> tuple[int, int]:
    """(characters, estimated tokens) of the prompt."""
    chars = exact = 0
    if op == "chat":
        messages = body.get("messages")
        for m in messages if isinstance(messages, list) else ():
            if isinstance(m, dict):
                c, t = _text_len(m.get("content"))
                chars += c
                exact += t
    else:
        c, exact = _text_len(body.get("prompt" if op == "completions" else "input"))
        chars += c
    return chars, exact + -(-chars // CHARS_PER_TOKEN)


def _printable(name: str) -> bool:
    """`name` is UTF-8 text without control characters (C0, DEL, C1)."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return not any(c < " " or "\x7f" <= c <= "\x9f" for c in name)


def _int(v: Any, name: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadModelRequest(f"{name} must be an integer", name)
    return v


def parse_request(
    op: Operation,
    headers: Headers,
    raw: bytes,
    *,
    model_header: bytes = MODEL_HEADER,
    tier_header: bytes = TIER_HEADER,
) -> ModelRequest:
    """Read one request body; BadModelRequest for a body no OpenAI server would take."""
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadModelRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadModelRequest("the body must be a JSON object")
    model: str | None
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise BadModelRequest("model must be a string", "model")
    if m and not _printable(m):
        # Routing, quotas and the response headers all use the name: one that is not
        # text (a lone surrogate, a control character) is refused before anything runs.
        raise BadModelRequest("model must be printable text", "model")
    if m:
        model, model_from = m, "body"
    elif (hv := headers.get(model_header)) is not None and hv:
        model, model_from = hv.decode("latin-1"), "header"
        if not _printable(model):
            raise BadModelRequest(f"the {model_header.decode()} header must be printable text")
    else:
        model, model_from = None, "none"
    stream = body.get("stream") is True
    opts = body.get("stream_options")
    include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
    max_tokens = _int(body.get("max_completion_tokens"), "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body.get("max_tokens"), "max_tokens")
    t = body.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float)):
        raise BadModelRequest("temperature must be a number", "temperature")
    chars, tokens = prompt_size(op, body)
    tier = headers.get(tier_header)
    return ModelRequest(
        operation=op,
        body=body,
        raw=raw,
        model=model,
        model_from=model_from,  # type: ignore[arg-type]
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=None if t is None else float(t),
        prompt_chars=chars,
        prompt_tokens=tokens,
        tier=tier.decode("latin-1") if tier is not None else None,
    )
