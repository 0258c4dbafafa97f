"""The message lists sent upstream in a Mixture-of-Agents turn: the advisory view and the reference block."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

__all__ = [
    "ADVISOR_SYSTEM",
    "CONTINUE_PROMPT",
    "MISSING_NOTE",
    "NO_REFERENCES",
    "REFERENCES_INSTRUCTION",
    "STALE_NOTE",
    "Reference",
    "inject_references",
    "reference_view",
]

# A reference model handed tools, or a transcript full of tool calls, tends to "run" tools in prose and
# report results it never saw; telling it that it only advises and that the bracketed lines are a record
# of what the acting assistant did keeps it to text.
ADVISOR_SYSTEM = (
    "You are an advisor to another AI assistant. That assistant, not you, takes every action and writes "
    "the reply the user will see; it will read what you write as advice. Respond in plain text with your "
    "best answer to the user's latest request, or your best advice on how the assistant should proceed. "
    "You have no tools: never claim that you ran a tool, searched, browsed, or executed code, and never "
    "write tool calls. Lines in square brackets in the conversation record tool activity by the other "
    "assistant; treat them as information you were given, not as something you did."
)

CONTINUE_PROMPT = (
    "How should the assistant continue from here? Give your advice on the next step, or the answer you "
    "would give the user."
)

REFERENCES_INSTRUCTION = (
    "Several other models have answered the user's latest request; their answers are listed below. "
    "Treat them as material to check, not as authority: any of them may be wrong, incomplete or biased, "
    "and they may contradict each other. Weigh them critically and write a single answer of your own "
    "that is accurate, complete and clearly organized. Do not mention these answers or that you were "
    "given them, and do not copy them word for word.\n\n"
    "Answers from other models:"
)

NO_REFERENCES = "No answers from other models are available for the user's latest request. Answer it on your own."

MISSING_NOTE = "Answers from these models were unavailable: {labels}. Your answer must not depend on them."

STALE_NOTE = (
    "Note: the answers above were written before the most recent tool results in this conversation. "
    "Where they disagree with those newer tool results, the tool results take precedence."
)

_SYSTEM_ROLES = frozenset({"system", "developer"})


class Reference(NamedTuple):
    """One reference model's answer, labelled so the aggregator's prompt and the traces can name it."""

    label: str
    """Which model answered, e.g. `gpt-4.1-mini` or `gpt-4.1-mini#2` for a second sample."""
    text: str
    """What that model answered."""


# Content is either text or, on user messages only, a list of parts that may carry images.
_Content = str | list[dict[str, Any]]


def reference_view(
    messages: Sequence[Mapping[str, Any]],
    *,
    tool_result_chars: int = 2000,
    slot_system: str | None = None,
) -> list[dict[str, Any]]:
    """The advisory view a reference model gets: no tools, prior tool activity as text, ending on a user turn.

    One system message comes first (the advisor prompt, then `slot_system`, then the caller's system and
    developer messages); tool calls and tool results become text, tool results longer than
    `tool_result_chars` keep their head and tail, and consecutive messages of one role are merged.
    """
    if tool_result_chars < 0:
        raise ValueError(f"tool_result_chars must be >= 0, got {tool_result_chars!r}")
    system_parts = [ADVISOR_SYSTEM]
    if slot_system:
        system_parts.append(slot_system)
    tool_names: dict[str, str] = {}
    body: list[tuple[str, _Content]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in _SYSTEM_ROLES:
            text = _text_of(content)
            if text:
                system_parts.append(text)
        elif role == "assistant":
            lines = [_text_of(content)]
            for call in message.get("tool_calls") or ():
                name, arguments = _call_parts(call)
                if isinstance(call.get("id"), str):
                    tool_names[call["id"]] = name
                lines.append(f"[called tool {name} with arguments {arguments}]")
            body.append(("assistant", "\n".join(line for line in lines if line)))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            name = tool_names.get(call_id, "unknown") if isinstance(call_id, str) else "unknown"
            result = _truncate(_text_of(content), tool_result_chars)
            body.append(("user", f"[result of tool {name} (call {call_id})]\n{result}"))
        elif isinstance(content, list):
            # Only user turns may carry non-text parts (images) through to the reference model.
            body.append(("user", copy.deepcopy(content)))
        else:
            body.append(("user", _text_of(content)))

    view: list[dict[str, Any]] = [{"role": "system", "content": "\n\n".join(system_parts)}]
    for role, content in body:
        if not content:
            continue
        previous = view[-1]
        # Some providers reject two turns of the same role in a row.
        if len(view) > 1 and previous["role"] == role:
            previous["content"] = _merge(previous["content"], content)
        else:
            view.append({"role": role, "content": content})
    if view[-1]["role"] != "user":
        view.append({"role": "user", "content": CONTINUE_PROMPT})
    return view


def inject_references(
    messages: Sequence[Mapping[str, Any]],
    references: Sequence[Reference],
    *,
    placement: Literal["system", "user"] = "system",
    template: str | None = None,
    missing: Sequence[str] = (),
    silent: bool = False,
    stale: bool = False,
) -> list[dict[str, Any]]:
    """Messages with the reference block added, for the aggregator (or for a proposer of the next layer).

    `placement="system"` appends the block to the leading system/developer message (or inserts one);
    `placement="user"` leaves the transcript untouched and appends the block as a final user message.
    """
    if placement not in ("system", "user"):
        raise ValueError(f"placement must be 'system' or 'user', got {placement!r}")
    block = reference_block(references, template=template, missing=missing, silent=silent, stale=stale)
    out = [copy.deepcopy(dict(message)) for message in messages]
    if placement == "user":
        # The transcript stays byte-identical across calls, so a provider's prefix cache over it still hits.
        out.append({"role": "user", "content": block})
    elif out and out[0].get("role") in _SYSTEM_ROLES:
        out[0]["content"] = _append_text(out[0].get("content"), block)
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


def reference_block(
    references: Sequence[Reference],
    *,
    template: str | None = None,
    missing: Sequence[str] = (),
    silent: bool = False,
    stale: bool = False,
) -> str:
    """The text that `inject_references` adds: instruction and numbered answers, plus the notes that apply."""
    listing = "\n\n".join(f"{i}. [{ref.label}]\n{ref.text}" for i, ref in enumerate(references, start=1))
    if not references:
        # A template is written around a list of answers; with none, it would only mislead.
        parts = [NO_REFERENCES]
    elif template is not None:
        parts = [template.format(references=listing)]
    else:
        parts = [f"{REFERENCES_INSTRUCTION}\n\n{listing}"]
    if missing and not silent:
        parts.append(MISSING_NOTE.format(labels=", ".join(missing)))
    if stale and references:
        parts.append(STALE_NOTE)
    return "\n\n".join(parts)


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping):
                texts.append(str(part))
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            else:
                # Say that something was there, so the advisor does not reason as if it never existed.
                texts.append(f"[{part.get('type', 'non-text')} content not shown]")
        return "\n".join(texts)
    return str(content)


def _call_parts(call: Mapping[str, Any]) -> tuple[str, str]:
    # Function tools carry `function`; custom (free-form) tools carry `custom` with `input`.
    spec = call.get("function") or call.get("custom") or {}
    name = spec.get("name") or "unknown"
    arguments = spec.get("arguments", spec.get("input", ""))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return str(name), arguments


def _truncate(text: str, budget: int) -> str:
    if len(text) <= budget:
        return text
    head = budget // 2
    tail = budget - head
    omitted = len(text) - budget
    # Slicing with len() - tail, not -tail, so a zero tail keeps nothing rather than everything.
    return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[len(text) - tail :]}"


def _merge(first: _Content, second: _Content) -> _Content:
    if isinstance(first, str) and isinstance(second, str):
        return f"{first}\n\n{second}"
    parts = _as_parts(first) + _as_parts(second)
    merged: list[dict[str, Any]] = []
    for part in parts:
        if merged and _is_text_part(merged[-1]) and _is_text_part(part):
            merged[-1] = {"type": "text", "text": f"{merged[-1]['text']}\n\n{part['text']}"}
        else:
            merged.append(part)
    return merged


def _as_parts(content: _Content) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _is_text_part(part: Mapping[str, Any]) -> bool:
    return part.get("type") == "text" and isinstance(part.get("text"), str)


def _append_text(content: Any, block: str) -> Any:
    if isinstance(content, list):
        return [*content, {"type": "text", "text": block}]
    text = _text_of(content)
    return f"{text}\n\n{block}" if text else block
