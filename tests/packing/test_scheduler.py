"""`StepScheduler` on tiny hand-made plans: every admission and every step, exactly.

No model: `helpers.Driver` plays the engine, request r finishing once it has drawn its
`max_tokens` (at least 1). Ids: a node is its own segment; request r's segment is
`num_nodes + r`. Log rows (see `Driver`): ("admit", group, starts, freed) and ("step",
decode rows (request, segment, offset), chunks (node, row, offset, count), node logits
(row, node), starts (request, node), freed), `freed` being what the report after it freed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from prefixbatch.packing import SlotAllocator, StepScheduler, store_capacity
from tests.packing.helpers import Driver, plan_of, scheduler_of

# Nodes: 1 = [1 2] (request 2 ends here), 2 = [3], 3 = [4] (request 0), 4 = [5] (request 1),
# 5 = [7 8 9] (request 3). One group, members in order 2, 1, 0, 3.
TREE = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2], [7, 8, 9]]
TREE_MAX_TOKENS = [2, 3, 1, 2]

# Group 0 = requests 0, 1 (nodes 1 = [1 2 3 4], 2 = [10], 3 = [11]); group 1 = requests 2, 3
# (nodes 1, 4 = [12], 5 = [7 8]); group 2 = request 4 (node 6 = [9 9 9]). Node 1 is kept
# from group 0 to group 1. Slots: group 0 takes 12, group 1 adds 8, group 2 adds 4.
GROUPS = [[1, 2, 3, 4, 10], [1, 2, 3, 4, 11], [1, 2, 3, 4, 12], [7, 8], [9, 9, 9]]
GROUPS_MAX_TOKENS = [3, 3, 3, 2, 1]


def run(prompts, max_tokens, *, kv_budget_tokens=100, capacity=100, max_step_tokens=4) -> Driver:
    plan = plan_of(prompts, max_tokens, kv_budget_tokens=kv_budget_tokens)
    scheduler = scheduler_of(plan, max_tokens, capacity=capacity, max_step_tokens=max_step_tokens)
    driver = Driver(scheduler, [max(m, 1) for m in max_tokens])
    driver.run()
    return driver


def test_one_group_prefills_parents_first_decodes_first_and_frees_as_requests_finish():
    driver = run(TREE, TREE_MAX_TOKENS)
    assert driver.log == [
        ("admit", 0, [], []),
        # Nodes 1 and 3 complete: their last rows give logits; requests 2 and 0 start (in the
        # order they wait). Request 2 (max_tokens 1) is done at once.
        ("step", [], [(1, 0, 0, 2), (2, 2, 0, 1), (3, 3, 0, 1)], [(1, 1), (3, 3)],
         [(2, 1), (0, 3)], [8]),
        # Decode rows first; node 5 gets the 2 rows left of the 4.
        ("step", [(0, 6, 0)], [(4, 1, 0, 1), (5, 2, 0, 2)], [(1, 4)], [(1, 4)], [6]),
        ("step", [(1, 7, 0)], [(5, 1, 2, 1)], [(1, 5)], [(3, 5)], []),
        # The group's last members finish: their segments, then its nodes, parents first.
        ("step", [(1, 7, 1), (3, 9, 0)], [], [], [], [7, 9, 1, 2, 3, 4, 5]),
    ]  # fmt: skip
    first = driver.steps[0]
    assert first.admitted_group_ids == (0,) and first.num_rows == 4
    # (segment, parent, first slot, keys after the step): nodes in group order, each followed
    # by the segments of the members whose prompt ends there (one key range per sequence).
    assert [(s.segment_id, s.parent_id, s.key_start, s.num_keys) for s in first.segments] == [
        (1, None, 0, 2), (8, 1, 2, 0), (2, 1, 3, 1), (3, 2, 4, 1), (6, 3, 5, 0),
        (4, 2, 7, 0), (7, 4, 8, 0), (5, None, 11, 0), (9, 5, 14, 0),
    ]  # fmt: skip
    assert [s.freed_segment_ids for s in driver.steps] == [(), (8,), (6,), ()]
    keys = {s.segment_id: s.num_keys for s in driver.steps[3].segments}
    assert (keys[7], keys[9]) == (2, 1)
    assert driver.scheduler.peak_used_tokens == 16 and driver.scheduler.slots.num_used_tokens == 0


def test_a_long_node_is_chunked_across_steps():
    # Node 1 = tokens 1..10 shared by two requests; children 2 = [11], 3 = [12].
    driver = run([[*range(1, 11), 11], [*range(1, 11), 12]], [2, 1], max_step_tokens=4)
    assert driver.log == [
        ("admit", 0, [], []),
        ("step", [], [(1, 0, 0, 4)], [], [], []),
        ("step", [], [(1, 0, 4, 4)], [], [], []),
        # The node's last 2 tokens, and both children ride in the same step.
        ("step", [], [(1, 0, 8, 2), (2, 2, 0, 1), (3, 3, 0, 1)], [(2, 2), (3, 3)],
         [(0, 2), (1, 3)], [5]),
        ("step", [(0, 4, 0)], [], [], [], [4, 1, 2, 3]),
    ]  # fmt: skip
    assert [step.prefill_chunks[0].token_start for step in driver.steps[:3]] == [0, 4, 8]
    assert [step.segments[0].num_keys for step in driver.steps] == [4, 8, 10, 10]


def test_a_group_that_does_not_fit_waits_and_the_next_is_not_admitted_ahead():
    plan = plan_of(GROUPS, GROUPS_MAX_TOKENS, kv_budget_tokens=12)
    scheduler = scheduler_of(plan, GROUPS_MAX_TOKENS, capacity=17, max_step_tokens=8)
    driver = Driver(scheduler, GROUPS_MAX_TOKENS)
    driver.admit_all()
    driver.step()
    # 5 slots free: group 1 needs 8 and waits; group 2 needs 4 but must not pass it.
    assert scheduler.slots.num_free_tokens == 5 and scheduler.admit() is None
    driver.run()
    assert driver.log == [
        ("admit", 0, [], []),
        ("step", [], [(1, 0, 0, 4), (2, 4, 0, 1), (3, 5, 0, 1)], [(4, 2), (5, 3)],
         [(0, 2), (1, 3)], []),
        ("step", [(0, 7, 0), (1, 8, 0)], [], [], [], []),
        # Group 0 is done: its members and nodes 2, 3; node 1 stays for group 1.
        ("step", [(0, 7, 1), (1, 8, 1)], [], [], [], [7, 8, 2, 3]),
        ("admit", 1, [], []),
        ("admit", 2, [], []),
        ("step", [], [(4, 0, 0, 1), (5, 1, 0, 2), (6, 3, 0, 3)], [(0, 4), (2, 5), (5, 6)],
         [(2, 4), (3, 5), (4, 6)], [11, 6]),
        ("step", [(2, 9, 0), (3, 10, 0)], [], [], [], [10]),
        ("step", [(2, 9, 1)], [], [], [], [9, 1, 4, 5]),
    ]  # fmt: skip
    assert [s.admitted_group_ids for s in driver.steps] == [(0,), (), (), (1, 2), (), ()]
    assert [s.freed_segment_ids for s in driver.steps] == [(), (), (), (7, 8, 2, 3), (11, 6), (10,)]
    assert scheduler.peak_used_tokens == 16


def test_a_kept_node_lives_until_the_last_group_that_needs_it_finishes():
    driver = run(GROUPS, GROUPS_MAX_TOKENS, kv_budget_tokens=12, capacity=14, max_step_tokens=8)
    assert driver.log == [
        ("admit", 0, [], []),
        ("step", [], [(1, 0, 0, 4), (2, 4, 0, 1), (3, 5, 0, 1)], [(4, 2), (5, 3)],
         [(0, 2), (1, 3)], []),
        ("step", [(0, 7, 0), (1, 8, 0)], [], [], [], []),
        ("step", [(0, 7, 1), (1, 8, 1)], [], [], [], [7, 8, 2, 3]),
        ("admit", 1, [], []),
        # Node 1 is not prefilled again: group 1 computes only its new nodes 4 and 5.
        ("step", [], [(4, 0, 0, 1), (5, 1, 0, 2)], [(0, 4), (2, 5)], [(2, 4), (3, 5)], []),
        ("step", [(2, 9, 0), (3, 10, 0)], [], [], [], [10]),
        ("admit", 2, [], []),  # request 3's 2 slots came back
        # Group 1 is done: node 1 goes now, with group 1's other nodes; then group 2's.
        ("step", [(2, 9, 1)], [(6, 1, 0, 3)], [(3, 6)], [(4, 6)], [9, 1, 4, 5, 11, 6]),
    ]  # fmt: skip
    assert driver.scheduler.peak_used_tokens == 14


def test_later_groups_start_from_a_kept_nodes_logits_at_admission():
    # Four samples of one prompt, one per group (budget 7 = 6 prompt tokens + 1).
    prompts, max_tokens = [[1, 2, 3, 4, 5, 6]] * 4, [1, 2, 1, 1]
    driver = run(prompts, max_tokens, kv_budget_tokens=7, capacity=9, max_step_tokens=8)
    assert driver.log == [
        ("admit", 0, [], []),
        ("admit", 1, [], []),
        ("step", [], [(1, 0, 0, 6)], [(5, 1)], [(0, 1), (1, 1)], [2]),
        # Request 2 draws at once from node 1's kept logits and is done: its slot lets group 3
        # in before the next step, while request 1 still runs.
        ("admit", 2, [(2, 1)], [4]),
        ("admit", 3, [(3, 1)], [5]),
        ("step", [(1, 3, 0)], [], [], [], [3, 1]),
    ]
    assert [s.admitted_group_ids for s in driver.steps] == [(0, 1), (2, 3)]
    assert [s.freed_segment_ids for s in driver.steps] == [(), (2, 4, 5)]


def test_a_group_that_fits_by_count_but_not_in_one_range_waits():
    # Nodes: 1 = [1], 2 = [2 3] under 1, 3 = [3] under 1, 4 = [2 3 2]. Group 0 = requests 0, 2,
    # 3 at slots 0..8; group 1 = request 4 (node 2 + its own 3 slots).
    prompts = [[1, 3], [2, 3, 2], [1, 3], [1, 3], [1, 2, 3]]
    max_tokens = [2, 2, 2, 3, 3]
    plan = plan_of(prompts, max_tokens, kv_budget_tokens=9)
    scheduler = scheduler_of(plan, max_tokens, capacity=11, max_step_tokens=4)
    driver = Driver(scheduler, max_tokens)
    for _ in range(2):
        driver.admit_all()
        driver.step()
    # Requests 0 and 2 freed slots 2..5; with 9..10, 6 are free for the 5 group 1 needs, but
    # its 3-slot segment fits in neither range.
    assert (scheduler.slots.num_free_tokens, scheduler.slots.largest_free_range) == (6, 4)
    assert scheduler.admit() is None
    assert scheduler.slots.num_free_tokens == 6  # the partial reservation was undone
    driver.run()
    assert [s.admitted_group_ids for s in driver.steps] == [(0,), (), (), (1, 2), (), ()]
    assert driver.log[3] == ("step", [(3, 8, 1)], [], [], [], [8, 3])


def test_peak_slots_never_exceed_the_capacity():
    peaks = {}
    for capacity in (12, 13, 14, 17, 20, 40):
        driver = run(
            GROUPS, GROUPS_MAX_TOKENS, kv_budget_tokens=12, capacity=capacity, max_step_tokens=3
        )
        peaks[capacity] = driver.scheduler.peak_used_tokens
        prefilled = {}
        for step in driver.steps:
            for chunk in step.prefill_chunks:
                prefilled[chunk.node_id] = prefilled.get(chunk.node_id, 0) + chunk.num_tokens
        assert prefilled == {1: 4, 2: 1, 3: 1, 4: 1, 5: 2, 6: 3}  # each node exactly once
        assert all(step.num_rows <= 3 for step in driver.steps)
    assert peaks == {12: 12, 13: 12, 14: 14, 17: 16, 20: 20, 40: 24}
    assert all(peak <= capacity for capacity, peak in peaks.items())


def test_an_idle_store_that_cannot_hold_a_group_is_an_error():
    plan = plan_of(TREE, TREE_MAX_TOKENS, kv_budget_tokens=100)
    scheduler = scheduler_of(plan, TREE_MAX_TOKENS, capacity=15, max_step_tokens=4)
    with pytest.raises(RuntimeError, match="KV store of 15 tokens cannot hold group 0"):
        scheduler.admit()
    assert scheduler.slots.num_used_tokens == 0


def test_reports_must_follow_and_name_what_ran():
    plan = plan_of(TREE, TREE_MAX_TOKENS, kv_budget_tokens=100)
    scheduler = scheduler_of(plan, TREE_MAX_TOKENS, capacity=100, max_step_tokens=4)
    scheduler.admit()
    scheduler.schedule()  # requests 2 and 0 start after it
    with pytest.raises(RuntimeError, match="report"):
        scheduler.schedule()
    with pytest.raises(ValueError, match=r"finished requests \[1\] did not run"):
        scheduler.report([1, 2])
    assert scheduler.report([2]) == (8,)


def test_the_store_holds_the_budget_an_over_budget_group_or_at_most_everything():
    plan = plan_of(GROUPS, GROUPS_MAX_TOKENS, kv_budget_tokens=12)
    # Nodes 4 + 1 + 1 + 1 + 2 + 3 = 12 slots, members 3 + 3 + 3 + 2 + 1 = 12.
    assert store_capacity(plan, GROUPS_MAX_TOKENS, kv_budget_tokens=10) == 12  # largest group
    assert store_capacity(plan, GROUPS_MAX_TOKENS, kv_budget_tokens=20) == 20
    assert store_capacity(plan, GROUPS_MAX_TOKENS, kv_budget_tokens=1000) == 24
    assert store_capacity(plan, [0, 0, 0, 0, 0], kv_budget_tokens=1000) == 17  # 1 slot each


def test_bad_arguments_are_named():
    plan = plan_of(TREE, TREE_MAX_TOKENS, kv_budget_tokens=100)
    with pytest.raises(ValueError, match=r"one entry per plan request \(4\), got 3"):
        StepScheduler(plan, [1, 1, 1], slots=SlotAllocator(10), max_step_tokens=4)
    with pytest.raises(ValueError, match="`max_step_tokens` must be at least 1, got 0"):
        StepScheduler(plan, TREE_MAX_TOKENS, slots=SlotAllocator(10), max_step_tokens=0)


def test_packing_never_imports_torch():
    modules = "prefixbatch.packing, prefixbatch.packing.scheduler, prefixbatch.packing.capacity"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
