"""Upstream prompts: the text-only advisory view for references, and the reference block for the aggregator."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from moa_stream._prompt import (
    ADVISOR_SYSTEM,
    CONTINUE_PROMPT,
    MISSING_NOTE,
    NO_REFERENCES,
    REFERENCES_INSTRUCTION,
    STALE_NOTE,
    Reference,
    inject_references,
    reference_view,
)

QUESTION: dict[str, Any] = {"role": "user", "content": "What is the capital of Australia?"}
SYSTEM: dict[str, Any] = {"role": "system", "content": "Answer briefly."}
A = Reference("gpt-4.1-mini", "Canberra.")
B = Reference("gpt-4.1-mini#2", "It is Canberra, not Sydney.")


def listing(*refs: Reference) -> str:
    return "\n\n".join(f"{i}. [{ref.label}]\n{ref.text}" for i, ref in enumerate(refs, start=1))


def block(*refs: Reference) -> str:
    return f"{REFERENCES_INSTRUCTION}\n\n{listing(*refs)}"


def missing_note(*labels: str) -> str:
    return MISSING_NOTE.format(labels=", ".join(labels))


def tool_turn(result: str) -> list[dict[str, Any]]:
    """A user question, a tool call, its result, and the assistant's follow-up."""
    return [
        SYSTEM,
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "assistant", "content": "It is sunny."},
    ]


# inject_references: the aggregator's prompt


def test_without_a_system_message_the_block_becomes_a_new_first_system_message() -> None:
    assert inject_references([QUESTION], [A]) == [{"role": "system", "content": block(A)}, QUESTION]


def test_the_block_is_appended_to_an_existing_system_message() -> None:
    assert inject_references([SYSTEM, QUESTION], [A]) == [
        {"role": "system", "content": f"Answer briefly.\n\n{block(A)}"},
        QUESTION,
    ]


def test_a_developer_message_counts_as_the_system_message_and_keeps_its_role() -> None:
    developer = {"role": "developer", "content": "Answer briefly."}
    assert inject_references([developer, QUESTION], [A]) == [
        {"role": "developer", "content": f"Answer briefly.\n\n{block(A)}"},
        QUESTION,
    ]


def test_a_system_message_with_list_content_gets_the_block_as_an_extra_text_part() -> None:
    system = {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}
    assert inject_references([system, QUESTION], [A]) == [
        {
            "role": "system",
            "content": [{"type": "text", "text": "Answer briefly."}, {"type": "text", "text": block(A)}],
        },
        QUESTION,
    ]


def test_one_reference_is_numbered_and_labelled() -> None:
    [system, _] = inject_references([QUESTION], [A])
    assert system["content"] == f"{REFERENCES_INSTRUCTION}\n\n1. [gpt-4.1-mini]\nCanberra."


def test_six_references_are_numbered_in_order_and_separated_by_blank_lines() -> None:
    refs = [Reference(f"m{i}", f"answer {i}") for i in range(1, 7)]
    expected = "\n\n".join(f"{i}. [m{i}]\nanswer {i}" for i in range(1, 7))
    assert inject_references([QUESTION], refs) == [
        {"role": "system", "content": f"{REFERENCES_INSTRUCTION}\n\n{expected}"},
        QUESTION,
    ]


def test_missing_references_are_named_in_a_note() -> None:
    assert inject_references([QUESTION], [A], missing=["claude-x", "gemini-y"]) == [
        {"role": "system", "content": f"{block(A)}\n\n{missing_note('claude-x', 'gemini-y')}"},
        QUESTION,
    ]


def test_silent_leaves_missing_references_unmentioned() -> None:
    assert inject_references([QUESTION], [A], missing=["claude-x"], silent=True) == [
        {"role": "system", "content": block(A)},
        QUESTION,
    ]


def test_with_every_reference_failed_the_model_is_told_to_answer_on_its_own() -> None:
    assert inject_references([QUESTION], [], missing=["gpt-4.1-mini", "gpt-4.1-mini#2"]) == [
        {"role": "system", "content": f"{NO_REFERENCES}\n\n{missing_note('gpt-4.1-mini', 'gpt-4.1-mini#2')}"},
        QUESTION,
    ]


def test_with_every_reference_failed_and_silent_only_the_answer_alone_text_is_added() -> None:
    assert inject_references([QUESTION], [], missing=["gpt-4.1-mini"], silent=True) == [
        {"role": "system", "content": NO_REFERENCES},
        QUESTION,
    ]


def test_a_template_replaces_the_instruction_and_receives_the_numbered_list() -> None:
    template = "Drafts from colleagues:\n{references}\nWrite the final answer."
    assert inject_references([QUESTION], [A, B], template=template) == [
        {"role": "system", "content": f"Drafts from colleagues:\n{listing(A, B)}\nWrite the final answer."},
        QUESTION,
    ]


def test_stale_references_carry_a_note_that_newer_tool_results_win() -> None:
    assert inject_references([QUESTION], [A], stale=True) == [
        {"role": "system", "content": f"{block(A)}\n\n{STALE_NOTE}"},
        QUESTION,
    ]


def test_user_placement_keeps_the_transcript_unchanged_and_appends_the_block() -> None:
    messages = [SYSTEM, QUESTION]
    assert inject_references(messages, [A, B], placement="user") == [
        SYSTEM,
        QUESTION,
        {"role": "user", "content": block(A, B)},
    ]


def test_tool_messages_pass_through_to_the_aggregator_unchanged() -> None:
    messages = tool_turn("sunny, 24 C")
    assert inject_references(messages, [A]) == [
        {"role": "system", "content": f"Answer briefly.\n\n{block(A)}"},
        *messages[1:],
    ]


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="placement"):
        inject_references([QUESTION], [A], placement="assistant")  # type: ignore[arg-type]


def test_two_layers_the_next_proposers_see_layer_one_and_the_aggregator_only_the_last_layer() -> None:
    layer1 = [Reference("p1", "LAYER-ONE alpha"), Reference("p2", "LAYER-ONE beta")]
    layer2 = [Reference("p1", "LAYER-TWO gamma"), Reference("p2", "LAYER-TWO delta")]
    messages = [SYSTEM, QUESTION]

    proposer = inject_references(reference_view(messages), layer1)
    assert proposer == [
        {"role": "system", "content": f"{ADVISOR_SYSTEM}\n\nAnswer briefly.\n\n{block(*layer1)}"},
        QUESTION,
    ]

    aggregator = inject_references(messages, layer2)
    assert aggregator == [{"role": "system", "content": f"Answer briefly.\n\n{block(*layer2)}"}, QUESTION]
    text = repr(aggregator)
    assert all(ref.text in text for ref in layer2)
    assert "LAYER-ONE" not in text


# reference_view: what a reference model is shown


def test_the_view_has_one_system_message_advisor_then_slot_then_the_callers() -> None:
    messages: list[dict[str, Any]] = [
        SYSTEM,
        QUESTION,
        {"role": "developer", "content": [{"type": "text", "text": "Cite sources."}]},
    ]
    assert reference_view(messages, slot_system="You are the skeptic.") == [
        {"role": "system", "content": f"{ADVISOR_SYSTEM}\n\nYou are the skeptic.\n\nAnswer briefly.\n\nCite sources."},
        QUESTION,
    ]


def test_without_any_system_message_the_view_starts_with_the_advisor_prompt() -> None:
    assert reference_view([QUESTION]) == [{"role": "system", "content": ADVISOR_SYSTEM}, QUESTION]


def test_the_view_renders_tool_activity_as_text_and_ends_on_a_user_turn() -> None:
    assert reference_view(tool_turn("sunny, 24 C")) == [
        {"role": "system", "content": f"{ADVISOR_SYSTEM}\n\nAnswer briefly."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": 'Let me check.\n[called tool weather with arguments {"city":"Paris"}]'},
        {"role": "user", "content": "[result of tool weather (call call_1)]\nsunny, 24 C"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": CONTINUE_PROMPT},
    ]


def test_a_long_tool_result_keeps_head_and_tail_and_counts_what_was_omitted() -> None:
    result = "H" * 10 + "m" * 85 + "T" * 5
    [_, _, _, rendered, *_] = reference_view(tool_turn(result), tool_result_chars=20)
    assert rendered == {
        "role": "user",
        "content": "[result of tool weather (call call_1)]\nHHHHHHHHHH\n[... 80 characters omitted ...]\nmmmmmTTTTT",
    }


def test_a_tool_result_within_budget_is_kept_whole() -> None:
    result = "x" * 20
    [_, _, _, rendered, *_] = reference_view(tool_turn(result), tool_result_chars=20)
    assert rendered["content"] == f"[result of tool weather (call call_1)]\n{result}"


def test_a_tool_result_without_a_matching_call_is_attributed_to_an_unknown_tool() -> None:
    messages: list[dict[str, Any]] = [
        QUESTION,
        {"role": "tool", "tool_call_id": "call_9", "content": [{"type": "text", "text": "42"}]},
    ]
    assert reference_view(messages) == [
        {"role": "system", "content": ADVISOR_SYSTEM},
        {"role": "user", "content": "What is the capital of Australia?\n\n[result of tool unknown (call call_9)]\n42"},
    ]


def test_consecutive_messages_of_one_role_are_merged_so_roles_alternate() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "First."},
        {"role": "system", "content": "Mid-conversation rule."},
        {"role": "user", "content": "Second."},
        {"role": "assistant", "content": None, "tool_calls": [_call("a", "search", "{}"), _call("b", "read", "{}")]},
        {"role": "tool", "tool_call_id": "a", "content": "found"},
        {"role": "tool", "tool_call_id": "b", "content": "read it"},
    ]
    assert reference_view(messages) == [
        {"role": "system", "content": f"{ADVISOR_SYSTEM}\n\nMid-conversation rule."},
        {"role": "user", "content": "First.\n\nSecond."},
        {
            "role": "assistant",
            "content": "[called tool search with arguments {}]\n[called tool read with arguments {}]",
        },
        {
            "role": "user",
            "content": "[result of tool search (call a)]\nfound\n\n[result of tool read (call b)]\nread it",
        },
    ]


def test_the_view_carries_no_tool_calls_tool_roles_or_extra_keys() -> None:
    messages: list[dict[str, Any]] = [{**QUESTION, "name": "alice"}, *tool_turn("sunny")[2:]]
    view = reference_view(messages)
    assert [set(message) for message in view] == [{"role", "content"}] * len(view)
    assert {message["role"] for message in view} == {"system", "user", "assistant"}


def test_user_image_parts_are_kept_and_merged_with_following_text() -> None:
    image: dict[str, Any] = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
        {"role": "user", "content": "Be brief."},
    ]
    assert reference_view(messages) == [
        {"role": "system", "content": ADVISOR_SYSTEM},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, image, {"type": "text", "text": "Be brief."}],
        },
    ]


def test_assistant_list_content_is_joined_to_text() -> None:
    messages: list[dict[str, Any]] = [
        QUESTION,
        {"role": "assistant", "content": [{"type": "text", "text": "Can"}, {"type": "text", "text": "berra"}]},
    ]
    assert reference_view(messages)[2] == {"role": "assistant", "content": "Can\nberra"}


def test_a_negative_tool_result_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="tool_result_chars"):
        reference_view([QUESTION], tool_result_chars=-1)


# Inputs belong to the caller


def test_neither_function_mutates_its_input_or_returns_aliases_into_it() -> None:
    image: dict[str, Any] = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
        *tool_turn("x" * 5000)[2:],
    ]
    before = copy.deepcopy(messages)

    for result in (
        reference_view(messages, slot_system="slot"),
        inject_references(messages, [A]),
        inject_references(messages, [A], placement="user"),
    ):
        for message in result:
            content = message["content"]
            if isinstance(content, list):
                content.append({"type": "text", "text": "tampered"})
                for part in content:
                    part["tampered"] = True
            for call in message.get("tool_calls", ()):
                call["function"]["name"] = "tampered"
            message["role"] = "tampered"

    assert messages == before


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
