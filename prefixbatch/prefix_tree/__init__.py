"""Prefix tree: the global token-level radix tree over every prompt of a job, and its plan.

Plain data only: never imports torch. Stages, each one module (in -> out):

    inputs   tokens + offsets + max_tokens      -> validated arrays
    lexsort  prompts                            -> lexicographic order + neighbour LCPs
    tree     order + LCPs                       -> PrefixTree (node arrays, preorder)
    stats    tree                               -> TreeStats (sharing, top prefixes)
    policies subtree totals                     -> sibling order keys
    cuts     work per item + K                  -> K balanced contiguous parts (used by both below)
    groups   tree + max_tokens + KV budget + K  -> Schedule (depth-first groups, KV lifetimes)
    shards   schedule + K                       -> Shards (contiguous, balanced)
    plan     all of the above                   -> Plan (serialisable, explain(), digest())
    planned  requests + PlanSettings            -> PlannedRequests (plan + what it indexes;
                                                   one shard's part of it)

`build_plan` runs them all on arrays; `plan_requests` is the entry point the rest of the
system uses (it calls `build_plan`): nothing outside this package plans.
"""

from prefixbatch.prefix_tree.groups import Schedule, schedule_groups
from prefixbatch.prefix_tree.inputs import PlanInputError, check_prompts, prompts_from_arrow
from prefixbatch.prefix_tree.plan import Group, Plan, Shard, assemble_plan, build_plan
from prefixbatch.prefix_tree.planned import (
    GROUP_SHARE,
    PlannedRequests,
    PlanSettings,
    plan_requests,
)
from prefixbatch.prefix_tree.policies import DEFAULT_POLICY, POLICIES, OrderPolicy, SubtreeTotals
from prefixbatch.prefix_tree.shards import Shards, cut_shards
from prefixbatch.prefix_tree.stats import SharedPrefix, TreeStats, tree_stats
from prefixbatch.prefix_tree.tree import ROOT, PrefixTree, build_tree

__all__ = [
    "DEFAULT_POLICY",
    "GROUP_SHARE",
    "POLICIES",
    "ROOT",
    "Group",
    "OrderPolicy",
    "Plan",
    "PlanInputError",
    "PlanSettings",
    "PlannedRequests",
    "PrefixTree",
    "Schedule",
    "Shard",
    "Shards",
    "SharedPrefix",
    "SubtreeTotals",
    "TreeStats",
    "assemble_plan",
    "build_plan",
    "build_tree",
    "check_prompts",
    "cut_shards",
    "plan_requests",
    "prompts_from_arrow",
    "schedule_groups",
    "tree_stats",
]
