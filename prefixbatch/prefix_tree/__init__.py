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
    plan     all of the above                   -> Plan (serialisable, explain())

`build_plan` runs them all.
"""

from prefixbatch.prefix_tree.groups import Schedule, schedule_groups
from prefixbatch.prefix_tree.inputs import PlanInputError, check_prompts, prompts_from_arrow
from prefixbatch.prefix_tree.plan import Group, Plan, Shard, assemble_plan, build_plan
from prefixbatch.prefix_tree.policies import DEFAULT_POLICY, POLICIES, OrderPolicy, SubtreeTotals
from prefixbatch.prefix_tree.shards import Shards, cut_shards
from prefixbatch.prefix_tree.stats import SharedPrefix, TreeStats, tree_stats
from prefixbatch.prefix_tree.tree import ROOT, PrefixTree, build_tree

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "ROOT",
    "Group",
    "OrderPolicy",
    "Plan",
    "PlanInputError",
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
    "prompts_from_arrow",
    "schedule_groups",
    "tree_stats",
]
