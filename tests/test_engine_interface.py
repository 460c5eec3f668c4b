"""The RolloutEngine interface (policylab/interfaces.py) on both hf engines: bind/generate/lifecycle, chat
``messages`` requests, clear errors, engine-neutral sampling transforms (HAPO's entropy temperature) and
engine parameters from a recipe."""

from __future__ import annotations

import pytest
import torch

from policylab import interfaces, models
from policylab.algo.logits_transforms import entropy_temperature_factor
from policylab.config import RecipeError, load_recipe
from policylab.interfaces import LogitsTransform, Sampling
from policylab.rollout.decode import PrunedDecodeEngine
from policylab.rollout.hf import HFEngine
from policylab.train.components import build_components

ENGINES = [HFEngine, PrunedDecodeEngine]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
ROWS = [{"prompt": f"{a} + {a + 3}="} for a in range(4)]


@pytest.fixture(scope="module")
def warm_model(tiny_arith_model):
    return models.load(tiny_arith_model)


def bound(engine_cls, model, tok, **params):
    engine = engine_cls(**params)
    engine.bind(model, tok)
    return engine


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_engines_satisfy_the_protocol_and_declare_their_field(engine_cls):
    engine = engine_cls()
    assert isinstance(engine, interfaces.RolloutEngine)
    assert "sampling_temperature_factor" in interfaces.declared(engine, "provides")


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_lifecycle_hooks_are_callable_and_generation_goes_on(engine_cls, warm_model):
    model, tok = warm_model
    engine = bound(engine_cls, model, tok)
    engine.sleep()
    engine.wake()
    engine.update_weights(model)
    engine.update_weights(model.state_dict())
    out = engine.generate(ROWS[:2], Sampling(group_size=2, max_new_tokens=3), group_offset=5)
    assert out.group.tolist() == [5, 5, 6, 6] and out.rows[2] is ROWS[1]
    assert torch.equal(out.extras["sampling_temperature_factor"], torch.ones(4))  # no transforms
    out.validate("engine")
    engine.close()


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_generate_before_bind_is_a_clear_error(engine_cls):
    with pytest.raises(RuntimeError, match=r"before bind\(model, tokenizer\)"):
        engine_cls().generate(ROWS, Sampling(group_size=1))


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_a_request_without_prompt_or_messages_names_its_index(engine_cls, warm_model):
    model, tok = warm_model
    with pytest.raises(ValueError, match=r"request 1 has neither 'prompt' nor 'messages'.*'question'"):
        bound(engine_cls, model, tok).generate([ROWS[0], {"question": "1 + 1="}], Sampling(group_size=1))


@pytest.mark.parametrize("engine_cls", ENGINES)
@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_messages_request_gives_the_prompt_rows_completion(engine_cls, template, tiny_arith_model):
    model, tok = models.load(tiny_arith_model)  # own tokenizer: the chat template is set on it
    tok.chat_template = template
    system = {"system": "Add."} if template else {}  # without a template a system line is "system\nprompt"
    rows = [{**r, **system} for r in ROWS]
    chats = [{"messages": ([{"role": "system", "content": "Add."}] if template else [])
              + [{"role": "user", "content": r["prompt"]}], "answer": i} for i, r in enumerate(ROWS)]
    greedy = Sampling(group_size=1, temperature=0.0, max_new_tokens=6)
    engine = bound(engine_cls, model, tok)
    a, b = engine.generate(rows, greedy), engine.generate(chats, greedy)
    assert a.prompts == b.prompts and torch.equal(a.prompt_ids, b.prompt_ids)
    assert a.completions == b.completions and torch.equal(a.completion_ids, b.completion_ids)
    assert [r["answer"] for r in b.rows] == [0, 1, 2, 3]  # the request rows travel with their completions
    if template:
        assert a.prompts[0].startswith("<system>Add.\n<user>") and a.prompts[0].endswith("<assistant>")


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_an_unknown_transform_kind_names_the_kind_the_engine_and_the_supported_kinds(engine_cls, warm_model):
    model, tok = warm_model
    engine = bound(engine_cls, model, tok)
    bad = Sampling(group_size=1, transforms=(LogitsTransform("min_p", {"p": 0.1}),))
    with pytest.raises(ValueError, match=rf"'min_p'.*{engine.name} engine.*entropy_temperature"):
        engine.generate(ROWS, bad)


def stats_params(tau: float) -> dict:
    return {"tau": tau, "pivot": 0.0, "rms": 1.0, "pos_max": 1.5, "neg_min": -3.0}


def sample(engine, transforms=(), seed=0):
    torch.manual_seed(seed)
    return engine.generate(ROWS, Sampling(group_size=4, temperature=0.8, max_new_tokens=6, transforms=transforms))


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_a_factor_one_transform_changes_nothing(engine_cls, warm_model):
    model, tok = warm_model
    engine = bound(engine_cls, model, tok)
    plain = sample(engine)
    neutral = sample(engine, (LogitsTransform("entropy_temperature", stats_params(0.0)),))
    assert plain.completions == neutral.completions
    assert torch.equal(plain.completion_ids, neutral.completion_ids)
    assert torch.equal(plain.behavior_logp, neutral.behavior_logp)
    assert torch.equal(neutral.extras["sampling_temperature_factor"], torch.ones(plain.batch_size))


def teacher_forced_logits(model, batch) -> torch.Tensor:
    """[B,T,V] raw next-token logits predicting each completion token (a plain forward, no engine)."""
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention = torch.cat([batch.prompt_mask.long(), torch.ones_like(batch.completion_ids)], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.float()
    p, t = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return logits[:, p - 1: p - 1 + t]


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_entropy_temperature_is_sampled_and_recorded_at_the_per_token_temperature(engine_cls, warm_model):
    model, tok = warm_model
    model.eval()
    engine = bound(engine_cls, model, tok)
    params = stats_params(0.5)
    hot = sample(engine, (LogitsTransform("entropy_temperature", params),))
    plain = sample(engine)
    mask = hot.completion_mask
    # behaviour log-probs = log softmax(z / (T0 * (1 + tau*h^))) of a plain forward: the on-policy ratio is 1
    z = teacher_forced_logits(model, hot)
    b, t, v = z.shape
    factor = entropy_temperature_factor(z.reshape(b * t, v), **params).reshape(b, t)
    expected = torch.log_softmax(z / (0.8 * factor[..., None]), -1).gather(-1, hot.completion_ids[..., None])[..., 0]
    assert torch.allclose(hot.behavior_logp, expected * mask, atol=1e-4)
    # the engine reports the per-row mean factor, and the transform really changed the distribution
    reported = hot.extras["sampling_temperature_factor"]
    assert torch.allclose(reported, (factor * mask).sum(-1) / mask.sum(-1).clamp(min=1), atol=1e-5)
    assert (reported != 1).any()
    plain_expected = torch.log_softmax(teacher_forced_logits(model, plain) / 0.8, -1)
    plain_expected = plain_expected.gather(-1, plain.completion_ids[..., None])[..., 0]
    assert torch.allclose(plain.behavior_logp, plain_expected * plain.completion_mask, atol=1e-4)
    assert not torch.allclose(expected * mask, torch.log_softmax(z / 0.8, -1).gather(
        -1, hot.completion_ids[..., None])[..., 0] * mask, atol=1e-3)


def test_greedy_ignores_transforms(warm_model):
    model, tok = warm_model
    greedy = Sampling(group_size=1, temperature=0.0, max_new_tokens=5)
    for engine_cls in ENGINES:
        engine = bound(engine_cls, model, tok)
        a = engine.generate(ROWS, greedy)
        b = engine.generate(ROWS, Sampling(**{**greedy.__dict__, "transforms": (
            LogitsTransform("entropy_temperature", stats_params(0.9)),)}))
        assert a.completions == b.completions
        assert torch.equal(b.extras["sampling_temperature_factor"], torch.ones(len(ROWS)))


def test_engine_parameters_from_a_recipe_are_validated():
    with pytest.raises(RecipeError, match=r"rollout\.engine.*draw"):
        load_recipe("grpo", {"rollout.engine": {"name": "hf_pruned", "draw": "gumbel"}})
    with pytest.raises(RecipeError, match=r"no parameter 'drow'"):
        load_recipe("grpo", {"rollout.engine": {"name": "hf_pruned", "drow": "multinomial"}})
    recipe = load_recipe("grpo", {"rollout.engine": {"name": "hf_pruned", "draw": "multinomial"}})
    engine = build_components(recipe).engine
    assert isinstance(engine, PrunedDecodeEngine) and engine.draw.__name__ == "draw_multinomial"
    assert isinstance(build_components(load_recipe("grpo", {"rollout.engine": "hf"})).engine, HFEngine)
