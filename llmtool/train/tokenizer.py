"""The tokenizer of a training run: a byte-level BPE trained on the user's text, or one given.

Either is saved into the output directory so that AutoTokenizer loads it beside the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtool.errors import UsageError

if TYPE_CHECKING:
    from llmtool.train.data import Corpus
    from llmtool.train.options import RunOptions

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE (GPT-2 style: every byte representable, no unknown tokens).

    Args:
        texts: Training text, in pieces.
        vocab_size: Target vocabulary, including the 256 byte symbols and ``<|endoftext|>``.
        min_frequency: Least count for a merge.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` whose BOS, EOS and pad are ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ValueError(
            f"vocab_size must be at least 258 (256 bytes + specials), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
    )


def make_tokenizer(options: RunOptions, corpus: Corpus) -> Any:
    """Train a byte-level BPE on the training split, or load the tokenizer directory given."""
    if options.tokenizer == "bpe":
        assert options.vocab_size is not None
        return train_bpe_tokenizer(corpus.head(1.0 - options.val_fraction), options.vocab_size)
    return load_tokenizer_dir(Path(options.tokenizer))


def load_tokenizer_dir(path: Path) -> Any:
    """A tokenizer saved with ``save_pretrained`` (pad falls back to EOS).

    Raises:
        UsageError: ``path`` is not a directory.
    """
    from llmtool.models.loading import ModelSpec, load_tokenizer

    if not path.is_dir():
        raise UsageError(
            f"Tokenizer directory {path} does not exist",
            "pass --tokenizer bpe or a directory holding tokenizer.json.",
        )
    return load_tokenizer(ModelSpec("hf_dir", path, None, str(path)))


def special_ids(tokenizer: Any) -> dict[str, int | None]:
    """The model config's ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (EOS if unset)."""
    eos = tokenizer.eos_token_id
    return {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    }
