"""Tiny hand-made plans, and a driver that runs the step scheduler the way the engine does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefixbatch.packing import SlotAllocator, Step, StepScheduler
from prefixbatch.prefix_tree import Plan, build_plan


def plan_of(
    prompts: Sequence[Sequence[int]], max_tokens: Sequence[int], *, kv_budget_tokens: int
) -> Plan:
    tokens = np.array([t for prompt in prompts for t in prompt], dtype=np.int64)
    offsets = np.cumsum([0] + [len(prompt) for prompt in prompts])
    max_tokens = np.array(max_tokens)
    return build_plan(tokens, offsets, max_tokens, kv_budget_tokens=kv_budget_tokens, num_shards=1)


def scheduler_of(
    plan: Plan, max_tokens: Sequence[int], *, capacity: int, max_step_tokens: int
) -> StepScheduler:
    slots = SlotAllocator(capacity)
    return StepScheduler(plan, max_tokens, slots=slots, max_step_tokens=max_step_tokens)


class Driver:
    """Plays the engine: request r finishes once it has drawn `lengths[r]` tokens.

    `log` gets one tuple per admission and per step, ending with what its report freed:
        ("admit", group id, starts [(request, node)], freed)
        ("step", decode rows [(request, segment, offset)], chunks [(node, row, offset, count)],
         node logits [(row, node)], starts [(request, node)], freed)
    A step's first logits rows are always its decode rows; the driver checks that itself.
    """

    def __init__(self, scheduler: StepScheduler, lengths: Sequence[int]) -> None:
        self.scheduler = scheduler
        self.lengths = lengths
        self.num_drawn: dict[int, int] = {}
        self.log: list[tuple] = []
        self.steps: list[Step] = []

    def run(self) -> list[tuple]:
        while not self.scheduler.is_done:
            self.admit_all()
            self.step()
        return self.log

    def admit_all(self) -> None:
        while (admission := self.scheduler.admit()) is not None:
            starts = [(s.request_id, s.node_id) for s in admission.starts]
            freed = self.scheduler.report(self.draw([r for r, _ in starts]))
            self.log.append(("admit", admission.group_id, starts, list(freed)))

    def step(self) -> Step | None:
        step = self.scheduler.schedule()
        if step is None:
            return None
        self.steps.append(step)
        decodes = [(d.request_id, d.segment_id, d.offset) for d in step.decode_rows]
        chunks = [(c.node_id, c.first_row, c.offset, c.num_tokens) for c in step.prefill_chunks]
        num_decodes = len(decodes)
        assert step.logits_rows[:num_decodes] == tuple(range(num_decodes))
        node_logits = list(zip(step.logits_rows[num_decodes:], step.logits_nodes, strict=True))
        starts = [(s.request_id, s.node_id) for s in step.starts]
        freed = self.scheduler.report(self.draw([r for r, *_ in decodes] + [r for r, _ in starts]))
        self.log.append(("step", decodes, chunks, node_logits, starts, list(freed)))
        return step

    def draw(self, request_ids: list[int]) -> list[int]:
        """One token each; → those that reached their length."""
        for r in request_ids:
            self.num_drawn[r] = self.num_drawn.get(r, 0) + 1
        return [r for r in request_ids if self.num_drawn[r] == self.lengths[r]]
