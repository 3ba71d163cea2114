"""`executor.kind: vllm` on SmolLM2-135M-Instruct: greedy chats equal the native executor's.

vLLM runs in a process of its own (`vllm_run.py` says why). Where a row differs, the
assertion names where the two parted and transformers' top-2 logits there, so a near-tie
(fp32 rounding choosing between two almost equal tokens) is told from a real difference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.real_model.oracle import parting
from tests.vllm_import import import_vllm

if importlib.util.find_spec("vllm") is None:
    import_vllm()  # not installed: skipped, or failed where vLLM is required (make test)

ROOT = Path(__file__).parents[2]


def test_vllm_greedy_chats_equal_native_token_for_token(smollm2, greedy_chats, transformers_model, tmp_path):
    requests, native = greedy_chats
    job = {"model": str(smollm2), "requests": [[r.row_index, r.token_ids, r.sampling.max_tokens] for r in requests]}
    (tmp_path / "in.json").write_text(json.dumps(job))
    command = [sys.executable, "-m", "tests.real_model.vllm_run", str(tmp_path / "in.json"), str(tmp_path / "out.json")]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = {row: (tuple(ids), reason, text) for row, ids, reason, text in json.loads((tmp_path / "out.json").read_text())}
    assert sorted(got) == sorted(row for row, _ in native)
    want = {row: (c.token_ids, c.finish_reason, c.text) for (row, _), c in native.items()}
    agree = sum(got[row] == want[row] for row in want)
    print(f"\nvllm == native: {agree}/{len(want)} chats")
    prompts = {r.row_index: r.token_ids for r in requests}
    differ = {row: parting(transformers_model, prompts[row], got[row][0], want[row][0])
              for row in want if got[row] != want[row]}
    assert not differ, differ
