"""Stage contracts: declared fields, the requires/provides chain check, the derived annotator order."""

import pytest
import torch

from policylab import fields as F
from policylab.config import load_recipe
from policylab.registry import register
from policylab.rollouts import Rollouts
from policylab.testing import make_rollouts
from policylab.train.components import build_components
from policylab.train.stages import ChainError, Node

F.declare_field("test_contract_row", per_row=True, shape="[B]", dtype="float", owner="tests")
F.declare_field("test_contract_tokens", per_row=True, shape="[B,T]", dtype="float", owner="tests")
F.declare_field("test_contract_batch", per_row=False, shape="scalar", owner="tests")
F.declare_field("test_contract_signal", per_row=True, shape="[B]", dtype="float", owner="annotator 'test_contract_signal'")
F.declare_field("test_contract_derived", per_row=True, shape="[B]", dtype="float", owner="annotator 'test_contract_derived'")
F.declare_field("test_contract_orphan", per_row=True, shape="[B]", dtype="float", owner="nobody")


# -- declared fields ---------------------------------------------------------------------------------


def test_undeclared_extras_field_is_rejected_with_its_name():
    r = make_rollouts([1.0, 0.0])
    with pytest.raises(F.FieldError, match="'test_contract_rwo' is not declared.*did you mean 'test_contract_row'"):
        r.extras["test_contract_rwo"] = torch.zeros(2)
    with pytest.raises(F.FieldError, match="not declared"):
        r.with_(extras={"tool_callz": [1, 2]})


def test_select_takes_per_row_fields_and_keeps_per_batch_ones():
    r = make_rollouts([1.0, 0.0, 0.5], lengths=[1, 2, 3], extras={
        "test_contract_row": torch.tensor([10.0, 11.0, 12.0]), "test_contract_tokens": torch.arange(9.0).view(3, 3),
        "test_contract_batch": 64})
    s = r.select([2, 0])
    assert s.extras["test_contract_row"].tolist() == [12.0, 10.0]
    assert s.extras["test_contract_tokens"].tolist() == [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]
    assert s.extras["test_contract_batch"] == 64
    # a per-batch field whose first dimension happens to equal B is NOT sliced: the schema decides, not the shape
    r.extras["test_contract_batch"] = torch.tensor([1, 2, 3])
    assert r.select([0]).extras["test_contract_batch"].tolist() == [1, 2, 3]


def test_concat_follows_the_schema():
    a = make_rollouts([1.0, 0.0], lengths=[1, 1], extras={"test_contract_row": torch.tensor([1.0, 2.0]),
                                                          "test_contract_tokens": torch.ones(2, 1), "test_contract_batch": 7})
    b = make_rollouts([0.5], lengths=[3], extras={"test_contract_row": torch.tensor([3.0]),
                                                  "test_contract_tokens": torch.full((1, 3), 2.0), "test_contract_batch": 7})
    c = Rollouts.concat([a, b])
    assert c.extras["test_contract_row"].tolist() == [1.0, 2.0, 3.0]
    assert c.extras["test_contract_tokens"].tolist() == [[1, 0, 0], [1, 0, 0], [2, 2, 2]]  # right-padded like the masks
    assert c.extras["test_contract_batch"] == 7
    c.validate("concat")
    # a field only some parts carry would misalign rows: an error naming it (the old concat dropped or kept it silently)
    b_missing = b.with_(extras={"test_contract_tokens": torch.full((1, 3), 2.0), "test_contract_batch": 7})
    with pytest.raises(F.FieldError, match="'test_contract_row'.*parts \\[0\\] of 2 only"):
        Rollouts.concat([a, b_missing])
    with pytest.raises(F.FieldError, match="per-batch field 'test_contract_batch'.*differs"):
        Rollouts.concat([a, b.with_(extras={**b.extras, "test_contract_batch": 8})])
    with pytest.raises(ValueError, match="ref_logp is set in some parts"):
        Rollouts.concat([a.with_(ref_logp=torch.zeros(2, 1)), b])


def test_validate_names_field_owner_and_stage():
    r = make_rollouts([1.0, 0.0], extras={"test_contract_row": torch.zeros(3)})
    with pytest.raises(F.FieldError, match="after annotator X: field 'test_contract_row' \\(owner tests\\) must have 2 rows"):
        r.validate("annotator X")
    r = make_rollouts([1.0, 0.0], extras={"test_contract_row": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(F.FieldError, match="float dtype"):
        r.validate()
    with pytest.raises(F.FieldError, match="declared twice"):
        F.declare_field("test_contract_row", per_row=False, shape="scalar", owner="someone else")
    with pytest.raises(F.FieldError, match="built-in Rollouts attribute"):
        F.declare_field("entropy", per_row=True)


# -- the chain check ------------------------------------------------------------------------------------


@register("annotator", "test_contract_signal", spec="test")
class SignalAnnotator:
    """Provides test_contract_signal = reward * 2."""

    requires = ("rewards",)
    provides = ("test_contract_signal",)
    calls = []

    def annotate(self, rollouts, ctx):
        SignalAnnotator.calls.append("signal")
        return {"test_contract_signal": rollouts.rewards * 2}


@register("annotator", "test_contract_derived", spec="test")
class DerivedAnnotator:
    """Provides test_contract_derived = signal + 1 (so it must run after the signal annotator)."""

    requires = ("test_contract_signal",)
    provides = ("test_contract_derived",)

    def annotate(self, rollouts, ctx):
        SignalAnnotator.calls.append("derived")
        return {"test_contract_derived": rollouts.extras["test_contract_signal"] + 1}


@register("annotator", "test_contract_loop_a", spec="test")
class LoopA:
    requires = ("test_contract_derived",)
    provides = ("test_contract_signal",)

    def annotate(self, rollouts, ctx):
        return {}


@register("advantage", "test_contract_reads_derived", requires=("test_contract_derived",), spec="test")
def reads_derived(rollouts):
    """Advantage = the derived field minus its group mean (a real use of an annotated field)."""
    x = rollouts.extras["test_contract_derived"]
    return x - x.mean()


@register("token_weights", "test_contract_needs_orphan", requires=("test_contract_orphan",), spec="test")
def needs_orphan(outputs, rollouts):
    """Weights from a field no component provides (to test the chain error)."""
    return rollouts.extras["test_contract_orphan"][:, None].expand_as(rollouts.completion_mask), {}


@register("regularizer", "test_contract_needs_ref", requires=("ref_logp",), spec="test")
def needs_ref(outputs, rollouts):
    """A zero loss that reads the reference log-probs."""
    return (outputs.logp - rollouts.ref_logp) * 0.0, {}


@register("token_weights", "test_contract_needs_entropy", requires=("entropy",), spec="test")
def needs_entropy(outputs, rollouts):
    """Weights 1 where the collection entropy is positive."""
    return (rollouts.entropy > 0).float(), {}


def _parts(recipe="dapo", **overrides):  # dapo: no KL term, so no reference model of its own
    return build_components(load_recipe(recipe, overrides))


def test_missing_provider_names_component_and_field_before_any_model_loads(monkeypatch):
    from policylab import models

    with pytest.raises(ChainError, match=r"algorithm\.token_weights\.0 \(token_weights 'test_contract_needs_orphan'\) "
                                         r"requires field 'test_contract_orphan', which nothing before it"):
        _parts(**{"algorithm.token_weights": [{"name": "test_contract_needs_orphan"}]})
    # the same through train(): the error comes before any model is loaded
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded before the chain check"))
    import policylab

    with pytest.raises(ChainError, match="test_contract_orphan"):
        policylab.train("grpo", model="tiny", run_dir="/tmp/policylab-never-written",
                        **{"algorithm.token_weights": [{"name": "test_contract_needs_orphan"}]})


def test_missing_provider_suggests_the_registered_annotator():
    with pytest.raises(ChainError, match="registered providers: .*annotator 'test_contract_signal'"):
        _parts(**{"algorithm.annotators": [{"name": "test_contract_derived"}]})


def test_annotators_run_in_dependency_order_not_recipe_order():
    parts = _parts(**{"algorithm.advantage": {"name": "test_contract_reads_derived"},
                      "algorithm.annotators": [{"name": "test_contract_derived"}, {"name": "test_contract_signal"}]})
    assert [n.where for n in parts.plan.prepare] == ["algorithm.annotators.1", "algorithm.annotators.0"]


def test_annotator_cycle_is_an_error():
    with pytest.raises(ChainError, match="cycle"):
        _parts(**{"algorithm.annotators": [{"name": "test_contract_loop_a"}, {"name": "test_contract_derived"}]})


def test_reference_and_entropy_requirements_add_the_builtin_scorers():
    parts = _parts(**{"algorithm.regularizers": [{"name": "test_contract_needs_ref"}]})
    assert parts.plan.needs_reference_model
    assert [n.provides for n in parts.plan.prepare] == [("ref_logp",)]
    parts = _parts(**{"algorithm.token_weights": [{"name": "test_contract_needs_entropy"}]})
    assert not parts.plan.needs_reference_model
    assert [n.provides for n in parts.plan.prepare] == [("entropy",)]
    # a recipe without KL loads no reference model and runs no extra pass; grpo's k3 KL does load one
    assert _parts("grpo").plan.needs_reference_model
    parts = _parts()
    assert not parts.plan.needs_reference_model and parts.plan.prepare == []


def test_unknown_required_field_name_is_an_error_with_a_suggestion():
    @register("token_weights", "test_contract_typo", requires=("ref_lgp",), spec="test")
    def typo(outputs, rollouts):
        """Requires a misspelt field."""
        return torch.ones_like(rollouts.completion_mask), {}

    with pytest.raises(ChainError, match="'ref_lgp', which is not a Rollouts attribute.*did you mean 'ref_logp'"):
        _parts(**{"algorithm.token_weights": [{"name": "test_contract_typo"}]})


def test_annotation_must_match_its_declaration():
    from policylab.train.loop import TrainingError, apply_annotations

    node = Node("algorithm.annotators.0", SignalAnnotator(), "annotate", ("rewards",), ("test_contract_signal",))
    batch = make_rollouts([1.0, 0.0])
    out = apply_annotations(batch, {"test_contract_signal": torch.tensor([2.0, 0.0])}, node)
    assert out.extras["test_contract_signal"].tolist() == [2.0, 0.0] and "test_contract_signal" not in batch.extras
    with pytest.raises(TrainingError, match="undeclared: \\['test_contract_row'\\]"):
        apply_annotations(batch, {"test_contract_signal": torch.zeros(2), "test_contract_row": torch.zeros(2)}, node)
    with pytest.raises(TrainingError, match="missing: \\['test_contract_signal'\\]"):
        apply_annotations(batch, {}, node)


def test_annotated_fields_reach_the_advantage_through_dynamic_sampling(tmp_path, tiny_arith_model):
    """Two annotators (listed out of order) feed an advantage, under DAPO dynamic sampling: the run trains."""
    import json

    import policylab
    from conftest import TINY_RUN

    SignalAnnotator.calls.clear()
    run = policylab.train("grpo", run_dir=tmp_path / "run", **{
        **TINY_RUN, "model.name": tiny_arith_model, "train.steps": 2, "train.eval_size": 0,
        "algorithm.advantage": {"name": "test_contract_reads_derived"},
        "algorithm.group_filter": {"name": "zero_variance"},
        "algorithm.annotators": [{"name": "test_contract_derived"}, {"name": "test_contract_signal"}]})
    assert SignalAnnotator.calls == ["signal", "derived"] * 2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "step" in m and "loss" in m] == [1, 2]
