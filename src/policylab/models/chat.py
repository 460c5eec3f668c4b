"""Chat formatting: the prompt text a model sees for a task row (shared by generation and warm-up)."""

from __future__ import annotations


def format_prompt(tokenizer, row: dict) -> str:
    """The prompt text the model sees: the chat template when the tokenizer has one, else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if row.get("system"):
            messages.append({"role": "system", "content": row["system"]})
        messages.append({"role": "user", "content": row["prompt"]})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (row["system"] + "\n" if row.get("system") else "") + row["prompt"]
