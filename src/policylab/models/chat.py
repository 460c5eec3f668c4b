"""Chat formatting: the prompt text a model sees for a task row (shared by generation and warm-up)."""

from __future__ import annotations


def prompt_messages(row: dict) -> list[dict]:
    """The row as chat messages: a conversational prompt (TRL's list of ``{role, content}``) as given, a plain
    string as one user message; the row's ``system`` column goes first unless the list already has one."""
    prompt = row["prompt"]
    messages = [dict(m) for m in prompt] if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": prompt}]
    if row.get("system") and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages


def format_prompt(tokenizer, row: dict) -> str:
    """The prompt text the model sees: the chat template when the tokenizer has one, else the raw prompt
    (a message list without a template: its contents joined by newlines, the rule of rollout/hf.py's
    ``format_request``, so both paths give a model without a template the same text)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
    if isinstance(row["prompt"], (list, tuple)):
        return "\n".join(str(m["content"]) for m in prompt_messages(row))
    return (row["system"] + "\n" if row.get("system") else "") + row["prompt"]
