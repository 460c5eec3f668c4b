"""Judge backends and the k-sample judge with its failure counters (data_agents_eval.md C2-C4).

A backend turns a prompt into k sampled texts: :class:`HFJudge` (any local transformers causal LM,
given as a model + tokenizer object or loaded by name) or :class:`OpenAIJudge` (an OpenAI-compatible
``/v1/chat/completions`` endpoint over urllib). :class:`Judge` adds parsing and counters: a backend
error or an unparsable judgement is counted and becomes None, never an exception in training.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable


class HFJudge:
    """A local transformers causal LM as judge. ``temperature`` 0 decodes greedily once (the k
    samples are then identical); above 0 samples k continuations."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, temperature: float = 0.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = int(max_new_tokens), float(temperature)
        self._lock = threading.Lock()  # one generate at a time on a shared model

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str = "auto", **kwargs) -> "HFJudge":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model.to(device).eval(), tokenizer, **kwargs)

    def complete(self, prompt: str, k: int) -> list[str]:
        import torch

        tokenizer = self.tokenizer
        chat = bool(getattr(tokenizer, "chat_template", None))
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False) if chat else prompt
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
        encoded = {name: t.to(self.model.device) for name, t in encoded.items()}
        sample = self.temperature > 0
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        options = dict(max_new_tokens=self.max_new_tokens, do_sample=sample, pad_token_id=pad,
                       num_return_sequences=k if sample else 1)
        if sample:
            options["temperature"] = self.temperature
        with self._lock, torch.no_grad():
            output = self.model.generate(**encoded, **options)
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts if sample else texts * k


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint. The API key is read from the environment variable named
    ``api_key_env`` (never written in a recipe). Asks for ``n=k`` choices and tops up with more
    requests if the server returns fewer; retries connection errors, 429 and 5xx."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 max_tokens: int = 256, temperature: float = 0.0, timeout_s: float = 60.0, max_retries: int = 2,
                 retry_backoff_s: float = 1.0):
        base = base_url.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.max_tokens, self.temperature, self.timeout_s = int(max_tokens), float(temperature), float(timeout_s)
        self.max_retries, self.retry_backoff_s = int(max_retries), float(retry_backoff_s)

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500 or attempt == self.max_retries:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if attempt == self.max_retries:
                    raise
            time.sleep(self.retry_backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def complete(self, prompt: str, k: int) -> list[str]:
        texts: list[str] = []
        for _ in range(k):  # at most k requests even if the server ignores n
            body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "n": k - len(texts),
                    "temperature": self.temperature, "max_tokens": self.max_tokens}
            reply = self._post(body)
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"judge endpoint returned no choices: {str(reply)[:200]}")
            texts.extend(str((c.get("message") or {}).get("content") or "") for c in choices)
            if len(texts) >= k:
                break
        return texts[:k]


# --------------------------------------------------------------------------------------------------
# The judge: k samples, parsing, counters
# --------------------------------------------------------------------------------------------------
@dataclass
class JudgeStats:
    calls: int = 0  # judge requests made
    failures: int = 0  # requests that raised (network, server, model errors)
    samples: int = 0  # judgements received
    unparsable: int = 0  # judgements the parser could not read
    prefiltered: Counter = field(default_factory=Counter)  # answers rejected before judging, by reason
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_prefiltered(self, reason: str) -> None:
        with self._lock:
            self.prefiltered[reason] += 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            out = {"judge/calls": self.calls, "judge/failures": self.failures, "judge/samples": self.samples,
                   "judge/unparsable": self.unparsable}
            out.update({f"judge/prefiltered_{k}": v for k, v in self.prefiltered.items()})
            return out


class Judge:
    """A backend plus k, with counters. :meth:`ask` returns the k parsed judgements (None where
    unparsable), or None when the backend failed."""

    def __init__(self, backend, *, k: int = 1):
        if k < 1:
            raise ValueError(f"k (judge samples) must be >= 1, got {k}")
        if not callable(getattr(backend, "complete", None)):
            raise TypeError(f"judge backend {type(backend).__name__} has no complete(prompt, k) method")
        self.backend, self.k, self.stats = backend, int(k), JudgeStats()

    def ask(self, prompt: str, parser: Callable[[str], object]) -> list | None:
        with self.stats._lock:
            self.stats.calls += 1
        try:
            texts = self.backend.complete(prompt, self.k)
        except Exception:  # noqa: BLE001 - a judge outage costs samples, not the run
            with self.stats._lock:
                self.stats.failures += 1
            return None
        parsed = [parser(text) for text in texts]
        with self.stats._lock:
            self.stats.samples += len(parsed)
            self.stats.unparsable += sum(p is None for p in parsed)
        return parsed
