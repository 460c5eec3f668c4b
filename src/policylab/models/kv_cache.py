"""The KV-cache keyword across transformers versions: ``past_key_values`` up to 5.x, ``cache`` in the newer
forward signatures (5.24 warns that ``past_key_values`` goes away in 5.40). Read from the model's own forward
signature, so one code path serves every version in pyproject's range."""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)``: the keyword this model's forward takes."""
    return {_keyword(type(model)): cache}


def returned_cache(output):
    """The cache a forward returned (``output.cache`` in new transformers, ``past_key_values`` before)."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)
