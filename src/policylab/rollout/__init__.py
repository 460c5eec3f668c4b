"""Generation engines behind one interface (policylab.interfaces.RolloutEngine): ``engine.bind(model, tokenizer)``
once, then ``engine.generate(requests, sampling, *, group_offset=0) -> Rollouts``."""
