"""Helpers shared by the probe-family tests (fake tokenizer, tiny model, text Rollouts, a StageContext) and
tests of the shared pieces: step segmentation, probe token batches, sampled continuations, correctness."""

from __future__ import annotations

import pytest
import torch

from policylab import testing
from policylab.algo.advantages.base_advantage import BaseAdvantage
from policylab.algo.advantages.probe_credit import segment_ends, segment_of_tokens, stop_position
from policylab.algo.group_stats import correctness, group_rank, zero_failed
from policylab.annotate.continuations import sample_continuations
from policylab.annotate.prompt_perturbation import corrupt_prompts
from policylab.annotate.token_batches import pad_left, score_pairs
from policylab.interfaces import declared
from policylab.registry import RegistryError
from policylab.rollouts import Rollouts


class CharTokenizer:
    """One token per ASCII character; ids 0/1 are pad/eos and never occur in text."""

    pad_token_id = 0
    eos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [min(ord(c), 127) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i)) for i in ids if not (skip_special_tokens and int(i) in (0, 1)))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode(text)}


def tiny_model(seed: int = 0, hidden: int = 32):
    return testing.tiny_model(seed=seed, vocab=128, hidden=hidden)


def make_rollouts(prompts, completions, group, rewards=None, rows=None, tokenizer=None) -> Rollouts:
    """Text rollouts through :func:`policylab.testing.make_rollouts`, tokenised one id per character."""
    tok = tokenizer or CharTokenizer()
    p_ids, p_mask = pad_left([tok.encode(p) for p in prompts], tok.pad_token_id)
    cs = [tok.encode(c) for c in completions]
    width = max(1, max(len(c) for c in cs))
    c_ids = torch.zeros(len(cs), width, dtype=torch.long)
    for i, c in enumerate(cs):
        c_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return testing.make_rollouts(rewards, group=list(group), lengths=[len(c) for c in cs], width=width,
                                 completion_ids=c_ids, prompt_ids=p_ids, prompt_mask=p_mask, prompts=list(prompts),
                                 completions=list(completions), rows=rows or [{} for _ in cs])


def make_ctx(model=None, tokenizer=None, step=0, ref_model=None, reward=None, engine=None):
    """A StageContext over ``model`` (:func:`policylab.testing.make_context`), CharTokenizer by default."""
    return testing.make_context(model, tokenizer or CharTokenizer(), reference=ref_model, step=step, reward=reward,
                                engine=engine)


def annotated(component, rollouts: Rollouts, ctx) -> Rollouts:
    """Run ``component.annotate`` as the loop does: it must return exactly its declared ``provides``."""
    values = component.annotate(rollouts, ctx)
    assert set(values) == set(declared(component, "provides")), (sorted(values), declared(component, "provides"))
    out = rollouts.with_(extras={**rollouts.extras, **values})
    out.validate(type(component).__name__)
    return out


def manual_answer_scores(model, tokenizer, context: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs and entropies at the ``answer`` tokens after ``context``: one unpadded
    forward, no library helper involved."""
    ctx_ids = tokenizer.encode(context)
    ans_ids = tokenizer.encode(answer)
    ids = torch.tensor([ctx_ids + ans_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    n = len(ctx_ids)
    rows = [logp[n - 1 + m] for m in range(len(ans_ids))]
    chosen = torch.stack([row[a] for row, a in zip(rows, ans_ids)])
    entropy = torch.stack([-(row.exp() * row).sum() for row in rows])
    return chosen, entropy


def manual_answer_logp(model, tokenizer, context: str, answer: str) -> torch.Tensor:
    return manual_answer_scores(model, tokenizer, context, answer)[0]


def completion_forward(model, prompt_ids, prompt_mask, completion_ids) -> dict[str, torch.Tensor]:
    """Reference teacher-forced pass for tests: {"logp", "entropy"} [N,T] of the completion tokens after
    left-padded prompts, one unpadded forward per row (no library helper involved)."""
    logps, entropies = [], []
    for i in range(completion_ids.shape[0]):
        prompt = prompt_ids[i][prompt_mask[i] > 0].tolist()
        ids = torch.tensor([prompt + completion_ids[i].tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        rows = logp[len(prompt) - 1 : len(prompt) - 1 + completion_ids.shape[1]]
        logps.append(rows.gather(-1, completion_ids[i][:, None]).squeeze(-1))
        entropies.append(-(rows.exp() * rows).sum(-1))
    return {"logp": torch.stack(logps), "entropy": torch.stack(entropies)}


# -- tests of the shared pieces ---------------------------------------------------------------------------


def test_segment_ends_on_token_boundaries_and_stop_marker():
    pieces = ["a", ".", "\n", "\n", "b", "\n\n", "c", "</think>", "\n\n"]
    assert segment_ends(pieces, "\n\n") == [3, 5, 8]
    assert segment_ends(pieces, "\n\n", stop_marker="</think>") == [3, 5]
    assert segment_ends(pieces, ".\n\n") == [3]
    assert stop_position(pieces, "</think>") == 7
    assert stop_position(pieces, None) is None


def test_segment_ends_thins_evenly_keeping_the_last():
    pieces = ["x\n\n"] * 10
    ends = segment_ends(pieces, "\n\n", max_segments=4)
    assert len(ends) == 4 and ends[0] == 0 and ends[-1] == 9


def test_segment_of_tokens():
    assert segment_of_tokens([1, 3], 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert segment_of_tokens([], 3).tolist() == [0, 0, 0]


def test_score_pairs_left_padding_matches_unpadded_pass():
    model = tiny_model()
    prompts = [[5, 6, 7, 8], [9, 10]]
    completions = [[20, 21, 22], [23, 24]]
    out = score_pairs(make_ctx(model), prompts, completions, 0)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
        want = torch.stack([logp[len(p) - 1 + t, c[t]] for t in range(len(c))])
        torch.testing.assert_close(out[i]["logp"], want, atol=1e-5, rtol=0)
        assert out[i]["entropy"].shape == (len(c),)


def test_corrupt_prompts_masks_only_real_unprotected_tokens():
    ids, mask = pad_left([[5, 6, 7, 8, 9], [3, 4]], 0)
    g = torch.Generator().manual_seed(0)
    all_masked = corrupt_prompts(ids, mask, mask_prob=1.0, replacement_id=99, generator=g, protect_last=1)
    assert all_masked[0].tolist() == [99, 99, 99, 99, 9]
    assert all_masked[1].tolist() == [0, 0, 0, 99, 4]  # padding untouched
    assert torch.equal(corrupt_prompts(ids, mask, mask_prob=0.0, replacement_id=99, generator=g), ids)
    with pytest.raises(ValueError, match="mask_prob"):
        corrupt_prompts(ids, mask, mask_prob=1.5, replacement_id=99, generator=g)


def test_group_rank_noncontiguous():
    rank, size = group_rank(torch.tensor([7, 3, 7, 7, 3]))
    assert rank.tolist() == [0, 0, 1, 2, 1]
    assert size.tolist() == [3, 2, 3, 3, 2]


def test_correctness_prefers_accuracy_component_and_nan_is_wrong():
    r = make_rollouts(["p"] * 3, ["a", "b", "c"], [0, 0, 0], rewards=[1.0, float("nan"), 0.0])
    assert correctness(r).tolist() == [1.0, 0.0, 0.0]
    assert correctness(r, threshold=1.0).tolist() == [0.0, 0.0, 0.0]
    r.reward_components["accuracy"] = torch.tensor([0.0, 1.0, float("nan")])
    assert correctness(r).tolist() == [0.0, 1.0, 0.0]


def test_base_advantage_unknown_name_is_a_clear_error():
    with pytest.raises(RegistryError, match="grpo"):
        BaseAdvantage("grpoo")


def test_zero_failed_zeroes_nan_rows():
    r = make_rollouts(["p"] * 2, ["ab", "cd"], [0, 0], rewards=[1.0, float("nan")])
    out = zero_failed(torch.ones(2, 2), r)
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_sample_continuations_cache_matches_full_recompute_and_is_seeded():
    model = tiny_model()
    contexts = [[5, 6, 7], [8]]
    kw = dict(num_samples=2, max_new_tokens=4, temperature=0.7, eos_id=None, pad_id=0)
    a = sample_continuations(model, contexts, generator=torch.Generator().manual_seed(1), **kw)
    b = sample_continuations(model, contexts, generator=torch.Generator().manual_seed(1), **kw)
    assert [s["tokens"] for s in a] == [s["tokens"] for s in b] and len(a) == 4
    for s, ctx in zip(a, [contexts[0]] * 2 + [contexts[1]] * 2):
        # recompute the drawn tokens' log-probs with one unpadded pass (no cache)
        ids = torch.tensor([ctx + s["tokens"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / 0.7, -1)
        want = torch.stack([logp[len(ctx) - 1 + t, tok] for t, tok in enumerate(s["tokens"])])
        torch.testing.assert_close(s["logp"], want, atol=1e-4, rtol=0)
