"""Packing: the native engine's step scheduler, as plain data (never imports torch).

    slots      segment id + token count      -> SlotRange (first fit), or None
    steps      the scheduler's decisions     -> Admission, Step (frozen, ids and counts)
    capacity   Plan + max_tokens + budget    -> slots the run's store holds
    scheduler  Plan + max_tokens + slots     -> admissions and packed steps; frees

The runner (`executors.native.engine`) turns each `Step` into tensors, samples, applies the
stop rules and reports back which sequences finished.
"""

from prefixbatch.packing.capacity import store_capacity
from prefixbatch.packing.scheduler import StepScheduler
from prefixbatch.packing.slots import SlotAllocator, SlotRange
from prefixbatch.packing.steps import (
    Admission,
    DecodeRow,
    PrefillChunk,
    ScoredRows,
    Segment,
    Start,
    Step,
)

__all__ = [
    "ScoredRows",
    "Admission",
    "DecodeRow",
    "PrefillChunk",
    "Segment",
    "SlotAllocator",
    "SlotRange",
    "Start",
    "Step",
    "StepScheduler",
    "store_capacity",
]
