"""Generation engines behind one interface: ``engine.generate(model, tokenizer, rows, settings) -> Rollouts``."""
