"""The KV-cache keyword follows the model's forward signature (transformers renamed past_key_values to cache)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from policylab.interfaces import Sampling
from policylab.models.kv_cache import cache_kwargs, returned_cache
from policylab.rollout.decode import PrunedDecodeEngine
from policylab import models


class OldStyle:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        pass


class NewStyle:
    def forward(self, input_ids=None, cache=None, use_cache=None):
        pass


def test_keyword_is_read_from_the_forward_signature():
    marker = object()
    assert cache_kwargs(OldStyle(), marker) == {"past_key_values": marker}
    assert cache_kwargs(NewStyle(), marker) == {"cache": marker}


def test_returned_cache_reads_either_output_field():
    a, b = object(), object()
    assert returned_cache(SimpleNamespace(cache=a)) is a
    assert returned_cache(SimpleNamespace(past_key_values=b)) is b
    assert returned_cache(SimpleNamespace(cache=None, past_key_values=b)) is b


def test_cached_decode_passes_no_deprecated_keyword():
    model, tok = models.load("tiny")
    engine = PrunedDecodeEngine()
    engine.bind(model, tok)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        out = engine.generate([{"prompt": "1 + 2="}, {"prompt": "3 + 4="}], Sampling(group_size=2, max_new_tokens=4))
    assert out.batch_size == 4
