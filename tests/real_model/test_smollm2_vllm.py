"""`executor.kind: vllm` on SmolLM2-135M-Instruct: greedy chats equal the native executor's.

vLLM's CPU build runs in this process, as in `tests/executors/test_vllm.py`. Where a row
differs, the assertion names where the two parted and transformers' top-2 logits there, so a
near-tie (fp32 rounding choosing between two almost equal tokens) is told from a real
difference.
"""

from __future__ import annotations

from prefixbatch.executors.config import ModelSpec
from tests.executors.planned import planned
from tests.executors.test_vllm import SPEC
from tests.real_model.chats import by_request
from tests.real_model.oracle import parting
from tests.vllm_import import import_vllm

import_vllm()


def test_vllm_greedy_chats_equal_native_token_for_token(smollm2, greedy_chats, transformers_model):
    from prefixbatch.executors.vllm_engine import VllmExecutor

    requests, native = greedy_chats
    executor = VllmExecutor(ModelSpec(path=str(smollm2), dtype="float32"), SPEC)
    got = by_request(executor.generate(planned(requests, SPEC, kind="vllm")))
    del executor  # its KV cache (1 GiB) goes with it
    assert got.keys() == native.keys()
    fields = {key: (c.token_ids, c.finish_reason, c.text) for key, c in native.items()}
    agree = sum(fields[key] == (c.token_ids, c.finish_reason, c.text) for key, c in got.items())
    print(f"\nvllm == native: {agree}/{len(native)} chats")
    prompts = {(r.row_index, r.sample_index): r.token_ids for r in requests}
    differ = {key: parting(transformers_model, prompts[key], c.token_ids, fields[key][0])
              for key, c in got.items() if fields[key] != (c.token_ids, c.finish_reason, c.text)}
    assert not differ, differ
