"""SmolLM2-135M-Instruct, a trained model, through every path that reads one: the real-model tier.

Random tiny models (tests/conftest.py) are exact oracles but hide what trained weights do:
natural end-of-sequence, calm logits, sensible JSON. Here, on the model the product fetches
as a GGUF file: the dequantized folder holds transformers' own GGUF load bit for bit, encodes
and generates as it does; the
native executor equals the hf executor token for token on everyday chats; its logprobs and
scores equal a transformers forward within 1e-4; it answers a multiple-choice set well above
chance; constrained JSON is valid and right; stop strings cut exactly; seeded samples repeat
and ignore their batch mates. Counts are printed (`pytest -s`) so they can be quoted.
"""

from __future__ import annotations

import json

import jsonschema
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.types import SamplingParams
from tests.executors.planned import planned
from tests.real_model.chats import QUESTIONS, by_request, chat, chat_requests, chat_token_ids
from tests.real_model.oracle import forward_logprobs, greedy

TOLERANCE = {"abs": 1e-4}


def test_the_folder_tokenizer_encodes_as_the_gguf_tokenizer(smollm2_gguf, tokenizer):
    gguf_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for index in range(len(QUESTIONS)):
        assert chat_token_ids(tokenizer, index) == chat_token_ids(gguf_tokenizer, index), index
    for text in ["Hello, world!", "naïve café: 42 × 7 = 294 €", "  two spaces\n\ttab", "<|im_start|>user\nHi<|im_end|>"]:
        assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"], text


def test_the_folder_model_is_transformers_own_gguf_load(smollm2_gguf, tokenizer, transformers_model):
    gguf_model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                      dtype=torch.float32).eval()
    ours, theirs = transformers_model.state_dict(), gguf_model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key  # bit for bit
    # The same weights under the folder's config.json generate as under the file's metadata.
    france = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    prompts = [france["input_ids"], *(chat_token_ids(tokenizer, index) for index in (5, 17, 23))]
    answer, *_ = outputs = greedy(transformers_model, prompts, 20)
    assert outputs == greedy(gguf_model, prompts, 20)
    assert tokenizer.decode(answer) == "The capital of France is Paris."  # a trained model


def test_native_greedy_chats_equal_the_hf_executor_token_for_token(smollm2, greedy_chats):
    requests, native = greedy_chats
    hf_executor = HfExecutor(ModelSpec(path=str(smollm2), dtype="float32"), ExecutorSpec(kind="hf", device="cpu"))
    hf = by_request(hf_executor.generate(planned(requests, kind="hf")))
    assert hf.keys() == native.keys()
    fields = {key: (c.token_ids, c.finish_reason, c.text) for key, c in native.items()}
    agree = sum(fields[key] == (c.token_ids, c.finish_reason, c.text) for key, c in hf.items())
    stops = sum(c.finish_reason == "stop" for c in native.values())
    print(f"\nnative == hf: {agree}/{len(native)} chats; {stops} ended by end-of-sequence,"
          f" {len(native) - stops} at max_tokens 48")
    for key, completion in hf.items():
        assert fields[key] == (completion.token_ids, completion.finish_reason, completion.text), key
    assert stops > len(native) / 2  # a trained model ends most answers itself
    for completion in native.values():
        assert completion.text.strip()
        assert (completion.finish_reason == "length") is (completion.num_output_tokens == 48)


def check_record(record, row: torch.Tensor, token: int, k: int, texts) -> float:
    """One logprob record against the oracle's log-softmax `row`: its token, its logprob, its
    top k; → how far its logprob is from the oracle's."""
    assert record.token_id == token and record.token == texts.decode([token])
    assert record.logprob == pytest.approx(row[token].item(), **TOLERANCE)
    values, ids = torch.topk(row, k)
    assert [i for i, _, _ in record.top] == ids.tolist()
    assert [lp for _, _, lp in record.top] == pytest.approx(values.tolist(), **TOLERANCE)
    return abs(record.logprob - row[token].item())


def test_logprobs_and_prompt_logprobs_equal_a_transformers_forward(native, tokenizer, transformers_model):
    sampling = SamplingParams(max_tokens=16, logprobs=5, prompt_logprobs=3)
    requests = chat_requests(tokenizer, sampling, rows=range(6))
    found = by_request(native.generate(planned(requests)))
    sequences = [[*r.token_ids, *found[r.row_index, 0].token_ids] for r in requests]
    gaps = []
    for request, tokens, expected in zip(requests, sequences, forward_logprobs(transformers_model, sequences)):
        completion = found[request.row_index, 0]
        assert len(completion.prompt_logprobs) == len(request.token_ids) - 1
        for position, record in enumerate(completion.prompt_logprobs):  # predicts prompt token position + 1
            gaps.append(check_record(record, expected[position], tokens[position + 1], 3, tokenizer))
        start = len(request.token_ids) - 1
        assert len(completion.logprobs) == completion.num_output_tokens > 0
        for step, record in enumerate(completion.logprobs):
            gaps.append(check_record(record, expected[start + step], completion.token_ids[step], 5, tokenizer))
    print(f"\nlogprobs == transformers within 1e-4: {len(gaps)} positions, largest gap {max(gaps):.1e}")


# Everyday facts, the right answer first (`choices_of` rotates it to every position).
FACTS = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid", " Rome"]),
    ("The largest planet in the solar system is", [" Jupiter", " Mars", " Venus", " Mercury"]),
    ("The number of days in a week is", [" seven", " five", " ten", " three"]),
    ("On a clear day, the color of the sky is", [" blue", " green", " red", " purple"]),
    ("The number of legs a spider has is", [" eight", " six", " four", " ten"]),
    ("The animal known as the king of the jungle is the", [" lion", " cow", " rabbit", " mouse"]),
    ("The opposite of hot is", [" cold", " tall", " fast", " loud"]),
    ("Bees make", [" honey", " milk", " glass", " paper"]),
    ("The Earth orbits the", [" Sun", " Moon", " Mars", " comet"]),
    ("Romeo and Juliet was written by William", [" Shakespeare", " Wordsworth", " Blake", " Golding"]),
    ("The main language spoken in Brazil is", [" Portuguese", " Spanish", " French", " German"]),
    ("A baby cat is called a", [" kitten", " puppy", " calf", " foal"]),
    ("The capital of Japan is", [" Tokyo", " Beijing", " Seoul", " Bangkok"]),
    ("Water turns into ice when it", [" freezes", " boils", " melts", " evaporates"]),
    ("The fastest land animal is the", [" cheetah", " turtle", " snail", " cow"]),
    ("The first month of the year is", [" January", " March", " July", " October"]),
]


def choices_of(index: int) -> list[str]:
    choices = FACTS[index][1]
    return choices[index % 4:] + choices[:index % 4]


def test_multiple_choice_scores_equal_a_transformers_forward_and_beat_chance(engine, tokenizer, transformers_model):
    rows = engine.score([prompt for prompt, _ in FACTS], [choices_of(i) for i in range(len(FACTS))]).to_pylist()
    assert len(rows) == 4 * len(FACTS)
    contexts = [tokenizer(FACTS[row["id"]][0])["input_ids"] for row in rows]
    choices = [choices_of(row["id"])[row["sample_index"]] for row in rows]
    sequences = [c + tokenizer(choice, add_special_tokens=False)["input_ids"] for c, choice in zip(contexts, choices)]
    best: dict[int, tuple[float, str]] = {}
    for row, context, choice, tokens, logp in zip(rows, contexts, choices, sequences,
                                                  forward_logprobs(transformers_model, sequences)):
        assert row["finish_reason"] == "scored" and row["output_token_ids"] == tokens[len(context):]
        assert row["num_prompt_tokens"] == len(tokens)
        positions = range(len(context) - 1, len(tokens) - 1)
        assert row["continuation_logprob"] == pytest.approx(sum(logp[p, tokens[p + 1]].item() for p in positions),
                                                            **TOLERANCE)
        best[row["id"]] = max(best.get(row["id"], (-float("inf"), "")), (row["continuation_logprob"], choice))
    right = sum(best[i][1] == FACTS[i][1][0] for i in best)
    print(f"\nmultiple choice: {right}/{len(FACTS)} right (accuracy {right / len(FACTS):.2f}; chance 0.25)")
    assert right / len(FACTS) >= 0.75


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PEOPLE = [
    ("Maria is 34 years old and lives in Lisbon.", "Maria", 34),
    ("Tom, a 52-year-old baker, opened a shop in Leeds.", "Tom", 52),
    ("Aiko turned 19 last week.", "Aiko", 19),
    ("At 71, George still walks to the market every morning.", "George", 71),
    ("Priya is a 28 year old engineer from Pune.", "Priya", 28),
    ("My neighbour Lars is 45.", "Lars", 45),
    ("Fatima, who is 23, studies medicine in Cairo.", "Fatima", 23),
    ("Carlos celebrated his 60th birthday in Mexico City.", "Carlos", 60),
    ("Emma is eight years old.", "Emma", 8),
    ("The pianist Ivan, aged 37, played in Vienna last night.", "Ivan", 37),
]


@pytest.fixture(scope="module")
def extracted(engine) -> list[dict]:
    """The people's sentences through a `json_schema` job (chats, greedy): its output rows."""
    chats = [[{"role": "user", "content": f"Extract the person's name and age from this sentence as JSON.\n{sentence}"}]
             for sentence, _, _ in PEOPLE]
    return engine.generate(chats, json_schema=PERSON, max_tokens=40).to_pylist()


def test_json_schema_outputs_are_valid_and_mostly_right(extracted):
    people = [json.loads(row["output_text"]) for row in extracted]
    assert [row["finish_reason"] for row in extracted] == ["stop"] * len(PEOPLE)
    for person in people:
        jsonschema.validate(person, PERSON)
    names = sum(person["name"] == name for person, (_, name, _) in zip(people, PEOPLE))
    ages = sum(person["age"] == age for person, (_, _, age) in zip(people, PEOPLE))
    print(f"\njson_schema: {len(people)}/{len(PEOPLE)} valid, names right {names}, ages right {ages}")
    assert names >= len(PEOPLE) - 1 and ages >= 0.6 * len(PEOPLE)


def test_json_outputs_keep_the_schema_property_order(extracted):
    assert [list(json.loads(row["output_text"])) for row in extracted] == [["name", "age"]] * len(PEOPLE)


def test_stop_strings_cut_the_greedy_text_exactly_before_them(engine, greedy_chats):
    """Each chat's greedy answer (native, 48 tokens), asked again with a stop string taken from
    its middle: a whole word, three characters that straddle tokens, or one never written."""
    _, native = greedy_chats
    texts = {row: native[row, 0].text for row in range(12) if len(native[row, 0].text) > 24}
    stops = {}
    for row, text in texts.items():
        middle = len(text) // 2
        word = text[middle:].split(" ")[1]
        stops[row] = [f" {word}", text[middle:middle + 3], "§§"][row % 3]
    table = pa.table({"id": list(texts), "messages": [chat(row) for row in texts], "stop": [[s] for s in stops.values()]})
    rows = {row["id"]: row for row in engine.generate(table, max_tokens=48).to_pylist()}
    for row, text in texts.items():
        stop = stops[row]
        if stop in text:
            expected = (text[:text.index(stop)], "stop")
        else:
            expected = (text, native[row, 0].finish_reason)
        assert (rows[row]["output_text"], rows[row]["finish_reason"]) == expected, (row, stop)
    cut = sum(stop in texts[row] for row, stop in stops.items())
    print(f"\nstop strings: {cut} rows cut before their stop string, {len(texts) - cut} ran on")
    assert cut >= len(texts) / 2


def test_seeded_samples_repeat_and_do_not_depend_on_batch_mates(engine):
    ids = ["a", "b", "c", "d"]
    table = pa.table({"id": ids, "messages": [chat(i) for i in range(len(ids))]})

    def samples(rows) -> dict:
        out = engine.generate(rows, n=3, temperature=0.8, seed=11, max_tokens=16).to_pylist()
        return {(row["id"], row["sample_index"]): row["output_token_ids"] for row in out}

    first, second = samples(table), samples(table)
    assert first == second and len(first) == 3 * len(ids)
    alone = samples(table.slice(2, 1))
    assert alone == {key: tokens for key, tokens in first.items() if key[0] == "c"}
    distinct = [len({tuple(first[i, k]) for k in range(3)}) for i in ids]
    print(f"\nn=3 at temperature 0.8: distinct samples per row {distinct}")
    assert sum(d > 1 for d in distinct) >= len(ids) / 2
