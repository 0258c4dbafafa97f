"""MoA-aware holds: before a layer fans out, reserve its references (and, for the first layer, the
aggregator) at their worst case in one step, so a budget is never half spent on references whose
aggregator it cannot pay for. When it cannot hold them all, the preset's `on_budget_short` says
what runs: the references that fit (the most expensive left out first), the aggregator alone, or
nothing (the turn is refused).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ._budget import BudgetBreach
from ._errors import Refusal
from ._events import BudgetShort, BudgetWarning
from ._holds import Hold, max_output_of
from ._meter import Turn
from ._presets import Preset, Slot


class LayerPlan(msgspec.Struct, kw_only=True):
    """What the budget lets a layer run: holds by reference label, the aggregator's hold."""

    holds: dict[str, Hold]
    aggregator: Hold | None = None
    left_out: list[str] = []
    refused: Refusal | None = None
    """Set when the turn cannot go on (the aggregator, or a `refuse` preset's layer, does not fit)."""
    short: BudgetBreach | None = None
    """The limit that left references out."""


async def plan_layer(
    turn: Turn,
    preset: Preset,
    layer: list[Slot],
    messages: list[Any],
    payload: dict[str, Any],
    *,
    first: bool,
    after: int = 0,
) -> LayerPlan:
    """Reserve a layer's references, and with the first layer the aggregator, per `on_budget_short`;
    `after` is what the layer before may add to their input (its output tokens, at most)."""
    policy = preset.on_budget_short
    holds = [
        turn.holds.hold_for(
            turn,
            model=slot.model,
            input_messages=messages,
            max_output_tokens=slot.max_tokens,
            required=policy != "fewer_references",
            label=slot.label,
            extra_input_tokens=after,
            weigh=policy == "fewer_references",  # to know which are the most expensive
        )
        for slot in layer
    ]
    aggregator = None
    if first:
        slot = preset.aggregator_slot()
        aggregator = turn.holds.hold_for(
            turn,
            model=slot.model,
            input_messages=messages,
            max_output_tokens=slot.max_tokens or max_output_of(payload),
            label=slot.label,
            extra_input_tokens=sum(hold.amounts.output_tokens for hold in holds),
        )
    if policy == "fewer_references":
        # Cheapest first: the ones left out are the most expensive (stable for equal ones).
        holds.sort(key=lambda hold: (hold.amounts.cost_usd, hold.amounts.input_tokens + hold.amounts.output_tokens))
    wanted = [*([aggregator] if aggregator is not None else []), *holds]
    admitted, refused = await turn.holds.reserve(turn, wanted)
    if not admitted and policy == "aggregator_alone" and aggregator is not None:
        admitted, _ = await turn.holds.reserve(turn, [aggregator])
    kept = {hold.call_id for hold in admitted}
    if aggregator is not None and aggregator.call_id not in kept:
        return LayerPlan(holds={}, refused=refused)
    if policy == "refuse" and refused is not None:
        return LayerPlan(holds={}, refused=refused)
    running = {hold.label: hold for hold in holds if hold.call_id in kept}
    return LayerPlan(
        holds=running,
        aggregator=aggregator,
        left_out=[slot.label for slot in layer if slot.label not in running],
        short=refused if isinstance(refused, BudgetBreach) else None,
    )


def short_warning(turn: Turn, model: str, policy: str, layer: int, plan: LayerPlan, total: int) -> BudgetWarning:
    breach = plan.short
    assert breach is not None
    kept = total - len(plan.left_out)
    return BudgetWarning(
        session_id=turn.session_id,
        turn_id=turn.turn_id,
        kind="budget_short",
        scope=breach.scope,
        limit=breach.limit,
        threshold=breach.threshold,
        spent=breach.spent,
        message=(
            f"{model}: the {breach.scope} limit {breach.scope}.{breach.limit} holds {kept} of the {total} "
            f"references of layer {layer} at their worst case; left out: {', '.join(plan.left_out)} "
            f"(on_budget_short = {policy!r})"
        ),
    )


def budget_short(policy: str, layer: int, plan: LayerPlan) -> BudgetShort:
    breach = plan.short
    return BudgetShort(
        policy=policy,
        layer=layer,
        left_out=plan.left_out,
        limit=f"{breach.scope}.{breach.limit}" if breach is not None else "",
    )
