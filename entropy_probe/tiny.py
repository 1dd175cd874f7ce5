"""A tiny character tokenizer and a tiny Qwen2 causal LM, built offline.

The tokenizer is a real `PreTrainedTokenizerFast` (a `tokenizers` WordLevel model over single
characters) so it round-trips through save_pretrained / AutoTokenizer. Its vocabulary is small
(digits, operators, a few markers, eos, pad) so exact enumeration of continuations stays feasible.
"""

from __future__ import annotations

import contextlib

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

EOS, PAD = "<eos>", "<pad>"
CHARS = list("0123456789+-=") + [" "]
VOCAB = CHARS + [EOS, PAD]  # 16 tokens


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    # every character is its own token; spaces are kept (no whitespace stripping)
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    # unk named (the core's own): a saved copy reloaded beside a Qwen2 config.json (a full model's dir) becomes a
    # Qwen2 tokenizer, whose default unk would otherwise be added as a 17th token
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_model(
    vocab_size: int = len(VOCAB),
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tie_word_embeddings: bool = False,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2, fp32, eval mode, with eager attention: the implementation every stage
    loads, since SDPA's CPU kernel has no double backward (the directional derivatives of delta-h1 need one).
    tie_word_embeddings: the head is the embedding matrix (as in Qwen2.5-0.5B): one parameter, two uses."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=64,
        eos_token_id=VOCAB.index(EOS) if eos_token_id is None else eos_token_id,
        pad_token_id=VOCAB.index(PAD) if pad_token_id is None else pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="eager",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """torch intra-op threads = 1 inside the block: a tiny model (the demo's training, the many small float64
    matmuls of exact enumeration) gains nothing from threads and loses a lot on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
