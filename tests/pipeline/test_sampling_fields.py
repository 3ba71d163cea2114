"""One list of sampling fields: `SamplingSpec`. Everything else is derived from it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from prefixbatch.pipeline.columns import OVERRIDE_RULES, OVERRIDE_TYPES
from prefixbatch.pipeline.config import SAMPLING_FIELDS, SamplingSpec
from prefixbatch.pipeline.requests import request_params
from prefixbatch.types import SamplingParams


def test_every_list_follows_the_spec():
    names = list(SamplingSpec.model_fields)
    assert list(SAMPLING_FIELDS) == names
    assert list(OVERRIDE_TYPES) == list(OVERRIDE_RULES) == names  # each field is an override column
    # a request carries every field but `n` (which makes n requests)
    assert [f.name for f in fields(SamplingParams)] == [n for n in names if n != "n"]
    spec = SamplingSpec(max_tokens=7, temperature=0.5, stop="x", stop_token_ids=[3])
    assert request_params(spec) == {
        "max_tokens": 7, "temperature": 0.5, "top_p": 1.0, "top_k": None, "seed": 0, "stop": ("x",), "stop_token_ids": (3,),
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0, "min_p": 0.0, "logit_bias": (), "logprobs": None, "prompt_logprobs": None,
        "json_schema": None, "regex": None, "choice": None,
    }


def test_the_readme_names_every_override_column():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    per_row = readme[readme.index("Per-row sampling:") :].split("\n\n")[0]
    assert all(f"`{name}`" in per_row for name in SAMPLING_FIELDS)
