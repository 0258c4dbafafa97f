"""An upstream we did not write: raw HTTP/1.1 on loopback replaying providers' exact bytes.

Nothing of moa_stream or its simulator is used here: requests are parsed by hand, responses are
written as scripted byte strings (chunked for event streams, one `write` per scripted part), so the
tests see what a real provider puts on the wire, including its quirks.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

CREATED = 1_741_569_952


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def asked_usage(self) -> bool:
        options = self.json().get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)
    """Written one at a time, each flushed before the next."""
    before_part: dict[int, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    """Awaited before writing part i (a gate a test opens, to hold a tail back)."""

    @property
    def streamed(self) -> bool:
        return any(name.lower() == "content-type" and "event-stream" in value for name, value in self.headers)


Handler = Callable[[Request], Reply]


class ScriptedUpstream:
    """Serve `handler` on 127.0.0.1 in a thread of its own; `base_url` is the OpenAI base URL."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._port = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def gate(self) -> Gate:
        """An event the server's loop waits on and a test opens from its own thread."""
        assert self.loop is not None
        return Gate(self.loop)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(method, path, headers, body)
                self.requests.append(request)
                await self._reply(writer, self.handler(request))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # The server is stopping: end quietly (Python 3.11's stream callback would log a
            # cancelled handler as an error).
            pass
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 500: "Internal Server Error"}
        head = [
            f"HTTP/1.1 {reply.status} {reason.get(reply.status, 'Status')}",
            *(f"{n}: {v}" for n, v in reply.headers),
        ]
        if reply.streamed:
            head.append("transfer-encoding: chunked")
        else:
            head.append(f"content-length: {sum(map(len, reply.parts))}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        for index, part in enumerate(reply.parts):
            wait = reply.before_part.get(index)
            if wait is not None:
                await wait()
            writer.write(b"%x\r\n%s\r\n" % (len(part), part) if reply.streamed else part)
            await writer.drain()
        if reply.streamed:
            writer.write(b"0\r\n\r\n")
            await writer.drain()


class Gate:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def open(self) -> None:
        self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self) -> None:
        await self._event.wait()


SSE = [("content-type", "text/event-stream; charset=utf-8"), ("x-request-id", "req_scripted")]


def sse(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def openai_chunks(request: Request, words: list[str], *, model: str = "gpt-4o-mini-2024-07-18") -> Iterator[bytes]:
    """OpenAI's chat stream as it is on the wire: `"usage":null` on every chunk and a final
    `choices: []` usage chunk only when the request asked for usage; `obfuscation` after usage."""
    asked = request.asked_usage()
    base = {
        "id": "chatcmpl-BQscripted",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        document: dict[str, Any] = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if asked:
            document["usage"] = None
        document["obfuscation"] = "xY3"
        return sse(document)

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for i, word in enumerate(words):
        yield chunk({"content": (" " if i else "") + word})
    yield chunk({}, "stop")
    if asked:
        usage = {
            "prompt_tokens": 11,
            "completion_tokens": len(words),
            "total_tokens": 11 + len(words),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        yield sse({**base, "choices": [], "usage": usage, "obfuscation": "Qw"})
    yield b"data: [DONE]\n\n"


def vllm_forced_usage_chunks(
    request: Request, words: list[str], *, model: str = "Qwen/Qwen2.5-1.5B"
) -> Iterator[bytes]:
    """vLLM started with `--enable-force-include-usage`: the usage chunk comes whether or not the
    request asked for it, and chunks carry no `usage` key (vLLM leaves unset fields out)."""
    base = {"id": "chatcmpl-4f1c0ffee", "object": "chat.completion.chunk", "created": CREATED, "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    for i, word in enumerate(words):
        yield chunk({"content": (" " if i else "") + word})
    yield chunk({"content": ""}, "stop")
    usage = {"prompt_tokens": 9, "total_tokens": 9 + len(words), "completion_tokens": len(words)}
    yield sse({**base, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


def error_reply(status: int, message: str) -> Reply:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
    return Reply(status=status, headers=[("content-type", "application/json")], parts=[body.encode()])


# -- the Responses API --------------------------------------------------------------------------------

RESPONSE_ID = "resp_68a1c0ffee0d8190b1e4a1f0c0ffee0d0a7e3f2b1c9d8e7f"


def openai_response(model: str, status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    """A Response object as OpenAI writes it, every field in its place (`usage` null until the end)."""
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


OPENAI_RESPONSES_USAGE = {
    "input_tokens": 37,
    "input_tokens_details": {"cached_tokens": 12},
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 8},
    "total_tokens": 57,
}


def openai_response_events(
    words: list[str],
    *,
    model: str = "gpt-4.1-2025-04-14",
    usage: dict[str, Any] | None = OPENAI_RESPONSES_USAGE,
    reasoning: list[str] | None = None,
    terminal: str = "response.completed",
) -> list[dict[str, Any]]:
    """OpenAI's Responses stream for a reply of `words` (after a reasoning summary, if given): every
    event with its sequence number, `obfuscation` on the deltas, the whole response at the end."""
    events: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append({"type": kind, "sequence_number": len(events), **fields})

    emit("response.created", response=openai_response(model, "in_progress", [], None))
    emit("response.in_progress", response=openai_response(model, "in_progress", [], None))
    output: list[dict[str, Any]] = []
    if reasoning:
        item = {"id": "rs_68a1c0ffee01", "type": "reasoning", "summary": []}
        emit("response.output_item.added", output_index=0, item=item)
        part = {"type": "summary_text", "text": ""}
        emit("response.reasoning_summary_part.added", item_id=item["id"], output_index=0, summary_index=0, part=part)
        for piece in reasoning:
            emit(
                "response.reasoning_summary_text.delta",
                item_id=item["id"],
                output_index=0,
                summary_index=0,
                delta=piece,
                obfuscation="a1",
            )
        text = "".join(reasoning)
        emit("response.reasoning_summary_text.done", item_id=item["id"], output_index=0, summary_index=0, text=text)
        done_part = {"type": "summary_text", "text": text}
        emit(
            "response.reasoning_summary_part.done", item_id=item["id"], output_index=0, summary_index=0, part=done_part
        )
        item = {**item, "summary": [done_part]}
        emit("response.output_item.done", output_index=0, item=item)
        output.append(item)
    index = len(output)
    message = {"id": "msg_68a1c0ffee02", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
    emit("response.output_item.added", output_index=index, item=message)
    empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    emit("response.content_part.added", item_id=message["id"], output_index=index, content_index=0, part=empty)
    for i, word in enumerate(words):
        emit(
            "response.output_text.delta",
            item_id=message["id"],
            output_index=index,
            content_index=0,
            delta=(" " if i else "") + word,
            logprobs=[],
            obfuscation="Zq9",
        )
    text = " ".join(words)
    where = {"item_id": message["id"], "output_index": index, "content_index": 0}
    emit("response.output_text.done", **where, text=text, logprobs=[])
    part = {**empty, "text": text}
    emit("response.content_part.done", **where, part=part)
    message = {**message, "status": "completed", "content": [part]}
    emit("response.output_item.done", output_index=index, item=message)
    output.append(message)
    status = {"response.completed": "completed", "response.incomplete": "incomplete", "response.failed": "failed"}
    final = openai_response(model, status[terminal], output, usage)
    if terminal == "response.incomplete":
        final["incomplete_details"] = {"reason": "max_output_tokens"}
    if terminal == "response.failed":
        final["error"] = {"code": "server_error", "message": "The model failed to finish its answer."}
    emit(terminal, response=final)
    return events


def event_stream(events: list[dict[str, Any]], *, named: bool = True, newline: bytes = b"\n") -> list[bytes]:
    """`events` as SSE blocks: `event:` and `data:` lines (or data only), ending lines with `newline`."""
    blocks = []
    for event in events:
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        lines = [b"event: " + event["type"].encode()] if named else []
        blocks.append(newline.join([*lines, b"data: " + data, b""]) + newline)
    return blocks
