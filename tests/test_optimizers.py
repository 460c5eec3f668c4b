"""Adam/AdamW prefer torch's fused kernel: same update as the reference loop, recipe choices respected."""

import pytest
import torch

from policylab import registry


@pytest.mark.parametrize("name,reference", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)])
def test_fused_default_matches_the_unfused_update(name, reference):
    registry.load_all()
    cls = registry.get("optimizer", name).target
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    b.load_state_dict(a.state_dict())
    mine = cls(a.parameters(), lr=0.1, weight_decay=0.01)
    ref = reference(b.parameters(), lr=0.1, weight_decay=0.01, foreach=False)
    assert mine.defaults["fused"] is True
    for step in range(3):
        for model in (a, b):
            model.zero_grad()
            model(torch.randn(8, 5, generator=torch.Generator().manual_seed(step))).pow(2).sum().backward()
        mine.step()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_recipe_can_turn_fused_off_and_unknown_parameters_still_fail():
    registry.load_all()
    entry = registry.get("optimizer", "adamw")
    registry.check_params(entry, {"lr": 0.1, "betas": (0.9, 0.95), "fused": False})
    assert entry.target(torch.nn.Linear(2, 2).parameters(), lr=0.1, fused=False).defaults["fused"] is False
    with pytest.raises(registry.RegistryError, match="lrr"):  # validation still sees torch's signature
        registry.check_params(entry, {"lrr": 0.1})
