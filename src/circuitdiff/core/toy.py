"""Toy components for tests and benchmarks: a word-level tokenizer for the task's vocabulary.

Offline and instant, it tokenises every task word as one GPT-2-style leading-space token, so
random-weight models of any shape can run the real task pipeline.
"""

from __future__ import annotations

from .task import DEFAULT_LABELS, DEFAULT_OBJECTS


def word_level_tokenizer():
    """A fast word-level tokenizer covering the task's words (leading-space forms included)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["The", "the", "is", "in", "Box", "contains", ",", "."]
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2}
    for w in words + list(DEFAULT_OBJECTS) + list(DEFAULT_LABELS):
        for form in (w, " " + w):
            vocab.setdefault(form, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[^A-Za-z\s]"),
                                            behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>")
