"""The real-model tier's prompts: everyday questions asked as chats, and requests made from them.

24 questions of varied lengths, each under one of three system prompts (the third is the
chat template's own default, SmolLM2's "You are a helpful AI assistant named SmolLM..."), so
a job shares three system-prompt prefixes. Rendered with the model folder's chat template
through `apply_chat_template`, as a user's `messages` column would be.
"""

from __future__ import annotations

from dataclasses import replace

from prefixbatch.types import Completion, Request, SamplingParams

SYSTEMS = [
    "You are a helpful assistant. Answer briefly.",
    "You are a friendly teacher. Keep your answers short and simple.",
    None,  # the chat template's default system prompt
]
QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "Why is the sky blue?",
    "Give me three tips for sleeping better.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is photosynthesis?",
    "How do I make a cup of tea?",
    "What is 12 times 12?",
    "Name a fruit that is yellow.",
    "What does a thermometer measure?",
    "Can you explain what a noun is, with an example?",
    "What is the largest planet in our solar system?",
    "How many legs does a spider have?",
    "What is the opposite of hot?",
    "Suggest a name for a pet cat.",
    "What language is spoken in Brazil?",
    "I have a job interview tomorrow morning and I am quite nervous about it. What should I do tonight to"
    " prepare, and how can I calm down before I go to sleep?",
    "Translate 'good morning' into Spanish.",
    "What is the freezing point of water in Fahrenheit?",
    "Write one sentence about the ocean.",
    "What are the primary colors?",
    "How many continents are there?",
    "What should I pack for a weekend trip to the mountains in autumn, when it may rain and the nights are"
    " cold? I will stay in a small cabin without heating.",
]


def chat(index: int) -> list[dict[str, str]]:
    """Question `index` under system prompt `index % 3`."""
    system = SYSTEMS[index % len(SYSTEMS)]
    user = {"role": "user", "content": QUESTIONS[index]}
    return [user] if system is None else [{"role": "system", "content": system}, user]


def chat_token_ids(tokenizer, index: int) -> tuple[int, ...]:
    rendered = tokenizer.apply_chat_template(chat(index), add_generation_prompt=True, tokenize=True)
    return tuple(rendered["input_ids"])


def chat_requests(tokenizer, sampling: SamplingParams, rows: range | None = None) -> list[Request]:
    """One request per question (all by default), each seeded with its own seed."""
    rows = rows if rows is not None else range(len(QUESTIONS))
    return [Request(i, chat_token_ids(tokenizer, i), replace(sampling, seed=1000 + i)) for i in rows]


def by_request(completions) -> dict[tuple[int, int], Completion]:
    return {(c.row_index, c.sample_index): c for c in completions}
