"""Chat completions as the simulator writes them: a deterministic plan per request, then OpenAI's
wire format (SSE chunks or a whole body), byte for byte as OpenAI sends it."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from ._models import SimModel, sim_token_count

# A fixed timestamp keeps identical requests byte-identical; nothing downstream needs wall time.
CREATED: Final = 1_700_000_000
_VOCAB: Final = (
    "river", "stone", "light", "quiet", "garden", "signal", "paper", "window", "bright", "early",
    "market", "silver", "forest", "simple", "careful", "engine", "harbor", "winter", "answer", "gentle",
    "measure", "follow", "pattern", "steady", "travel", "little", "open", "reason", "summer", "corner",
    "thread", "balance", "mirror", "distant", "useful", "lantern", "meadow", "number", "orange", "planet",
    "record", "shadow", "table", "valley", "wonder", "yellow", "bridge", "castle", "cloud", "detail",
    "field", "honest", "island", "journey", "kettle", "ladder", "modest", "north", "ocean", "pocket",
    "rapid", "season", "tower", "vivid",
)  # fmt: skip
_TOOL_RESULT_PREFIX: Final = ("Based", "on", "the", "tool", "result,")

_json: Final = msgspec.json.Encoder()
_canonical: Final = msgspec.json.Encoder(order="deterministic")
_decoder: Final = msgspec.json.Decoder()

DONE: Final = b"data: [DONE]\n\n"
MALFORMED: Final = b"data: {not json\n\n"
MALFORMED_JSON: Final = b"{not json"
STREAM_ERROR: Final = (
    b'data: {"error": {"message": "simulated in-stream error", "type": "server_error", "code": "sim_error"}}\n\n'
)
_CHUNK_TAIL: Final = b',"logprobs":null,"finish_reason":null}]}\n\n'
# Once usage is asked for, OpenAI adds `"usage":null` to every chunk but the usage chunk.
_CHUNK_TAIL_ASKED: Final = b',"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
BROKEN_UTF8: Final = "é".encode()[:1]
INVALID_UTF8_EVENT: Final = (
    b'data: {"id":"chatcmpl-sim-broken","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"sim","choices":[{"index":0,"delta":{"content":" caf' + BROKEN_UTF8 + b'"},"finish_reason":null}]}\n\n'
)


@dataclasses.dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    arguments: str
    fragments: list[str]


@dataclasses.dataclass(slots=True)
class _Plan:
    """Everything one chat completion will say, decided before the first byte."""

    id: str
    model: str
    content: list[str]
    reasoning: list[str]
    tool_call: _ToolCall | None
    finish_reason: str
    usage: dict[str, Any]
    ttft_s: float
    token_delay_s: float

    def token_events(self) -> int:
        tool = len(self.tool_call.fragments) if self.tool_call else 0
        return len(self.reasoning) + len(self.content) + tool


def validate(request: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) of the first thing wrong with a chat request, as OpenAI would name it."""
    if not isinstance(request.get("model"), str) or not request["model"]:
        return "model", "you must provide a model parameter"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages", "'messages' must be a non-empty array"
    if not all(isinstance(m, dict) for m in messages):
        return "messages", "each entry of 'messages' must be an object"
    if (problem := _tool_order_problem(messages)) is not None:
        return problem
    for param in ("max_tokens", "max_completion_tokens"):
        value = request.get(param)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return param, f"'{param}' must be an integer >= 1, got {value!r}"
    seed = request.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        return "seed", f"'seed' must be an integer, got {seed!r}"
    temperature = request.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or isinstance(temperature, bool)):
        return "temperature", f"'temperature' must be a number, got {temperature!r}"
    return None


def _tool_order_problem(messages: list[dict[str, Any]]) -> tuple[str, str] | None:
    """OpenAI's rule for tool messages: they answer, right after it, each call of the assistant
    message before them (a conversation rebuilt in the wrong order is refused upstream)."""
    open_ids: set[str] | None = None  # the calls still unanswered, while inside a tool-call block
    opened_at = 0
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            if open_ids is None:
                return (
                    f"messages.[{index}].role",
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message "
                    "with 'tool_calls'.",
                )
            open_ids.discard(str(message.get("tool_call_id")))
            continue
        if open_ids:
            missing = ", ".join(sorted(open_ids))
            return (
                f"messages.[{opened_at}].role",
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                f"'tool_call_id'. The following tool_call_ids did not have response messages: {missing}",
            )
        calls = message.get("tool_calls") if role == "assistant" else None
        open_ids = {str(call.get("id")) for call in calls if isinstance(call, dict)} if calls else None
        opened_at = index
    return None


def _message_texts(message: dict[str, Any]) -> Iterator[str]:
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            yield function["arguments"]


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    # OpenAI's chat accounting: a few tokens of framing per message and per reply.
    words = sum(sim_token_count(text) for m in messages for text in _message_texts(m))
    return 3 * len(messages) + words + 3


# -- generation ------------------------------------------------------------------------------


def plan(model: SimModel, name: str, request: dict[str, Any]) -> _Plan:
    messages: list[dict[str, Any]] = request["messages"]
    temperature = request.get("temperature")
    key = [
        name,
        messages,
        request.get("seed"),
        None if temperature is None else float(temperature),
    ]
    digest = hashlib.sha256(_canonical.encode(key)).hexdigest()
    rng = random.Random(digest)

    tool_call = _tool_call(request, rng, digest)
    after_tool = messages[-1].get("role") == "tool"
    prefix = _TOOL_RESULT_PREFIX if after_tool else ()
    words = [*prefix, *(rng.choice(_VOCAB) for _ in range(model.reply_tokens - len(prefix)))]
    words = words[: model.reply_tokens]
    words[0] = words[0].capitalize()
    words[-1] += "."
    reasoning = [rng.choice(_VOCAB) for _ in range(model.reasoning_tokens)]

    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    if tool_call is not None:
        content: list[str] = []
        finish_reason = "tool_calls"
        completion = sim_token_count(tool_call.arguments)
    else:
        content = words if limit is None else words[:limit]
        finish_reason = "length" if len(content) < len(words) else "stop"
        completion = len(content)
    completion += len(reasoning)
    prompt = _prompt_tokens(messages)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": len(reasoning)},
    }
    multiplier = math.exp(rng.gauss(0.0, model.jitter)) if model.jitter else 1.0
    return _Plan(
        id=f"chatcmpl-sim-{digest[:24]}",
        model=name,
        content=content,
        reasoning=reasoning,
        tool_call=tool_call,
        finish_reason=finish_reason,
        usage=usage,
        ttft_s=model.ttft_s * multiplier,
        token_delay_s=1.0 / model.tokens_per_s if model.tokens_per_s > 0 else 0.0,
    )


def _tool_call(request: dict[str, Any], rng: random.Random, digest: str) -> _ToolCall | None:
    tools = request.get("tools")
    choice = request.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if request["messages"][-1].get("role") == "tool":
        return None
    functions = [t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not functions:
        return None
    function = functions[0]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        function = next((f for f in functions if f.get("name") == wanted), function)
    arguments = _arguments(function.get("parameters"), rng)
    # Cut points chosen by the rng so fragments differ between requests but not between runs.
    pieces = min(rng.randint(2, 4), len(arguments))
    cuts = sorted(rng.sample(range(1, len(arguments)), pieces - 1))
    bounds = [0, *cuts, len(arguments)]
    fragments = [arguments[a:b] for a, b in itertools.pairwise(bounds)]
    return _ToolCall(
        id=f"call_sim_{digest[:24]}",
        name=str(function.get("name", "")),
        arguments=arguments,
        fragments=fragments,
    )


def _arguments(schema: object, rng: random.Random) -> str:
    properties = schema.get("properties") if isinstance(schema, dict) else None
    arguments: dict[str, Any] = {}
    for key, spec in (properties if isinstance(properties, dict) else {}).items():
        spec = spec if isinstance(spec, dict) else {}
        kind = spec.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), None)
        enum = spec.get("enum")
        if isinstance(enum, list) and enum:
            arguments[key] = rng.choice(enum)
        elif kind == "string":
            arguments[key] = rng.choice(_VOCAB)
        elif kind in ("integer", "number"):
            arguments[key] = rng.randint(1, 9)
        elif kind == "boolean":
            arguments[key] = True
        else:
            arguments[key] = None
    # The stdlib's ", " / ": " separators make the arguments several words for the tokenizer.
    return json.dumps(arguments)


# -- encoding --------------------------------------------------------------------------------


def stream_events(plan: _Plan, *, usage_chunk: bool, null_usage: bool) -> Iterator[tuple[bytes, float]]:
    """The SSE chunk events of a streamed completion with the delay before each (no [DONE]):
    `usage_chunk` adds the final usage chunk, `null_usage` a `"usage":null` key to the others."""
    head = b"".join(
        [
            b'data: {"id":',
            _json.encode(plan.id),
            b',"object":"chat.completion.chunk","created":',
            str(CREATED).encode(),
            b',"model":',
            _json.encode(plan.model),
            b',"system_fingerprint":"fp_sim","choices":[{"index":0,"delta":',
        ]
    )
    encode = _json.encode
    delay = plan.token_delay_s
    gap = 0.0  # no delay before the first token: ttft covers it
    tail = _CHUNK_TAIL_ASKED if null_usage else _CHUNK_TAIL

    if plan.tool_call is None:
        yield head + b'{"role":"assistant","content":""}' + tail, plan.ttft_s
    else:
        yield head + b'{"role":"assistant","content":null}' + tail, plan.ttft_s
    for i, word in enumerate(plan.reasoning):
        token = " " + word if i else word
        yield head + b'{"reasoning_content":' + encode(token) + b"}" + tail, gap
        gap = delay
    for i, word in enumerate(plan.content):
        token = " " + word if i else word
        yield head + b'{"content":' + encode(token) + b"}" + tail, gap
        gap = delay
    call = plan.tool_call
    if call is not None:
        first = {
            "tool_calls": [
                {
                    "index": 0,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            ]
        }
        yield head + encode(first) + tail, 0.0
        for fragment in call.fragments:
            piece = {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
            yield head + encode(piece) + tail, gap
            gap = delay
    finish = b',"logprobs":null,"finish_reason":' + encode(plan.finish_reason) + b"}]"
    yield head + b"{}" + finish + (b',"usage":null}\n\n' if null_usage else b"}\n\n"), 0.0
    if usage_chunk:
        document = {
            "id": plan.id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": plan.model,
            "system_fingerprint": "fp_sim",
            "choices": [],
            "usage": plan.usage,
        }
        yield b"data: " + encode(document) + b"\n\n", 0.0


def completion(plan: _Plan, *, include_usage: bool) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": " ".join(plan.content) if plan.tool_call is None else None,
        "refusal": None,
    }
    if plan.reasoning:
        message["reasoning_content"] = " ".join(plan.reasoning)
    if plan.tool_call is not None:
        call = plan.tool_call
        function = {"name": call.name, "arguments": call.arguments}
        message["tool_calls"] = [{"id": call.id, "type": "function", "function": function}]
    document: dict[str, Any] = {
        "id": plan.id,
        "object": "chat.completion",
        "created": CREATED,
        "model": plan.model,
        "system_fingerprint": "fp_sim",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}],
    }
    if include_usage:
        document["usage"] = plan.usage
    return document
