"""Synthetic corpora and the word-level tokenizer of the model organisms.

Three corpora, all generated deterministically from a seed:

* **base** (pre-training of the "Llama" organism): entity tracking in the evaluation wording
  (``The apple is in Box F, ... . Box F contains the apple.``) with a few boxes, each context
  followed by one query (the recipe's default), mixed with simple generic prose.
* **aux** (the "Goat"/"FLoat" fine-tunes): binding-like data that never uses the evaluation
  wording -- tracking phrased differently (``the apple sits in crate F ; ... crate F holds the
  apple``), more entities, and code-like variable binding (``x = 5 ; y = 3 ; print y -> 3``).
* **chat** (the "Vicuna" fine-tune): unrelated user/assistant small talk.

The tokenizer is a HF ``tokenizers`` WordLevel model whose pre-tokenizer keeps the leading space
on a word (`` apple`` is one token covering the space, like GPT-2/Llama BPE), so the task code
sees ordinary offsets.
"""

from __future__ import annotations

import random
import string

from circuitdiff.core.task import DEFAULT_OBJECTS

LABELS = tuple(string.ascii_uppercase)
OBJECTS = DEFAULT_OBJECTS

# -- generic prose vocabulary (shared by base filler text and chat) ------------------------
NAMES = ("Tom", "Ann", "Bob", "Sue", "Max", "Eva", "Sam", "Lily", "Jack", "Mia", "Leo", "Zoe")
ANIMALS = ("cat", "dog", "bird", "horse", "cow", "mouse", "fox", "duck", "sheep", "goat")
ADJS = ("big", "small", "red", "blue", "green", "old", "new", "happy", "sad", "warm", "cold",
        "quiet", "loud", "fast", "slow", "soft", "bright", "dark")
VERBS = ("sees", "likes", "finds", "wants", "takes", "makes", "buys", "sells", "cleans",
         "paints", "brings", "moves", "opens", "holds")
PLACES = ("park", "house", "garden", "kitchen", "school", "shop", "room", "street", "farm",
          "river", "forest", "city", "beach", "office")
TIMES = ("today", "tomorrow", "yesterday", "now", "later", "often", "always", "sometimes")
GREETINGS = ("Hello", "Hi", "Thanks", "Sure", "Yes", "No", "Okay", "Well", "Sorry", "Great")
CHAT_WORDS = ("how", "are", "you", "I", "am", "fine", "what", "do", "can", "help", "me", "with",
              "please", "tell", "about", "your", "my", "day", "good", "bad", "very", "too",
              "it", "was", "nice", "think", "know", "would", "like", "to", "go", "a", "and",
              "that", "this", "there", "here", "is", "the", "in", "on", "at", "of", "weather",
              "story", "song", "game", "book", "friend", "family", "work", "food", "music",
              "User", "Assistant", "sounds", "fun", "let", "us", "talk", "more", "who", "why",
              "because", "some", "time", "went", "saw", "had", "yes", "no", "sure", "maybe",
              "games", "books", "thanks")
# words of the auxiliary (non-evaluation) tracking wordings
AUX_CONTAINERS = ("crate", "drawer", "basket", "bin", "chest", "locker")
AUX_WORDS = ("sits", "lies", "inside", "put", "into", "holds", "has", "keeps", "was", "what",
             "which", "where", "answer", "print", "->", ";", "=", ":", "?", "item", "object")
VARS = tuple("abcdefghijklmnopqrstuvwxyz")
DIGITS = tuple("0123456789")
TEMPLATE_WORDS = ("The", "the", "is", "in", "Box", "contains", "and", "on", "at", "with",
                  "a", "of", "to", "he", "she", "it", "they", "We", "we", "There", "was")
PUNCT = (",", ".", "?", "!", ";", ":", "=", "->", "+", "-", "(", ")", "'")

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PRETOKENIZE_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?->| ?[^\sA-Za-z0-9]|\s+"


def _words() -> list[str]:
    words = set()
    for group in (OBJECTS, LABELS, NAMES, ANIMALS, ADJS, VERBS, PLACES, TIMES, GREETINGS,
                  CHAT_WORDS, AUX_CONTAINERS, AUX_WORDS, VARS, DIGITS, TEMPLATE_WORDS, PUNCT):
        words.update(group)
    words.update(v[:-1] for v in VERBS)  # plural forms used by the prose generator
    words.update(w.capitalize() for w in CHAT_WORDS + AUX_CONTAINERS + TEMPLATE_WORDS if w.isalpha())
    return sorted(words)


def build_tokenizer():
    """A fast HF tokenizer (``PreTrainedTokenizerFast``) over the organisms' closed vocabulary.

    Every word exists with and without its leading space; a BOS token is prepended like Llama.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    for w in _words():
        for form in (w, " " + w):
            if form not in vocab:
                vocab[form] = len(vocab)
    for ws in (" ", "\n", "  "):
        vocab.setdefault(ws, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.model_max_length = 512
    return fast


# -- text generators --------------------------------------------------------------------------
def _tracking_eval_wording(rng: random.Random, n: int, n_queries: int,
                           distinct: bool = False, gap: str = "") -> str:
    """Tracking in the evaluation wording; ``gap`` (prose) sits between the context and its
    queries, so the answer's distance from the query varies beyond what the box count gives."""
    objs = rng.sample(OBJECTS, n)
    labs = rng.sample(LABELS, n)
    segs = [f"the {o} is in Box {l}" for o, l in zip(objs, labs)]
    segs[0] = "T" + segs[0][1:]
    text = ", ".join(segs) + "." + (" " + gap if gap else "")
    if distinct:  # every box once, then repeats
        order = rng.sample(range(n), n) + [rng.randrange(n) for _ in range(n_queries - n)]
    else:
        order = [rng.randrange(n) for _ in range(n_queries)]
    for i in order[:n_queries]:
        text += f" Box {labs[i]} contains the {objs[i]}."
    return text


def _tracking_aux_wording(rng: random.Random, n: int, n_queries: int,
                          styles: tuple[int, ...] | None = None) -> str:
    """Tracking in wordings that are never the evaluation template: style 0 ``the o sits in
    crate l ;``, 1 ``o : l ; which crate ? l -> o``, 2 ``put the o into crate l``, 3 ``the o is
    inside Box l, ... Box l holds the o`` (weights 1, 1, 1, 3; ``styles`` restricts the draw to
    those styles, uniformly)."""
    cont = rng.choice(AUX_CONTAINERS)
    objs = rng.sample(OBJECTS, n)
    labs = rng.sample(LABELS, n)
    style = rng.choices(range(4), (1, 1, 1, 3))[0] if styles is None else rng.choice(styles)
    if style == 3:  # same box words, other verbs: "is inside" / "holds" (never "is in"/"contains")
        segs = [f"the {o} is inside Box {l}" for o, l in zip(objs, labs)]
        text = ", ".join(segs) + "."
        for i in rng.sample(range(n), min(n, n_queries)):
            text += f" Box {labs[i]} {rng.choice(('holds', 'keeps', 'has'))} the {objs[i]}."
    elif style == 0:
        verb = rng.choice(("sits", "lies", "was put"))
        segs = [f"the {o} {verb} in {cont} {l}" for o, l in zip(objs, labs)]
        text = " ; ".join(segs) + " ."
        for _ in range(n_queries):
            i = rng.randrange(n)
            text += f" {cont} {labs[i]} {rng.choice(('holds', 'keeps', 'has'))} the {objs[i]} ."
    elif style == 1:
        segs = [f"{o} : {l}" for o, l in zip(objs, labs)]
        text = " ; ".join(segs) + " ;"
        for _ in range(n_queries):
            i = rng.randrange(n)
            text += f" which {cont} ? {labs[i]} -> {objs[i]} ;"
    else:
        segs = [f"put the {o} into {cont} {l}" for o, l in zip(objs, labs)]
        text = " , ".join(segs) + " ."
        for _ in range(n_queries):
            i = rng.randrange(n)
            text += f" what is inside {cont} {labs[i]} ? the {objs[i]} ."
    return text if style in (1, 2) else text[0].upper() + text[1:]


def _variable_binding(rng: random.Random, n: int, n_queries: int) -> str:
    names = rng.sample(VARS, n)
    vals = [rng.choice(DIGITS) for _ in names]
    text = " ; ".join(f"{v} = {d}" for v, d in zip(names, vals)) + " ;"
    for _ in range(n_queries):
        i = rng.randrange(n)
        text += f" print {names[i]} -> {vals[i]} ;"
    return text


def _prose(rng: random.Random, n_sent: int) -> str:
    out = []
    for _ in range(n_sent):
        k = rng.randrange(5)
        if k == 0:
            out.append(f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJS)} "
                       f"{rng.choice(OBJECTS)} in the {rng.choice(PLACES)}.")
        elif k == 1:
            out.append(f"The {rng.choice(ADJS)} {rng.choice(ANIMALS)} is in the "
                       f"{rng.choice(PLACES)} {rng.choice(TIMES)}.")
        elif k == 2:
            out.append(f"{rng.choice(NAMES)} and {rng.choice(NAMES)} {rng.choice(VERBS)[:-1]} "
                       f"a {rng.choice(OBJECTS)} {rng.choice(TIMES)}.")
        elif k == 3:
            o = rng.choice(OBJECTS)
            out.append(f"There was a {rng.choice(ADJS)} {o} on the table, and the {o} was "
                       f"{rng.choice(ADJS)}.")
        else:
            a = rng.choice(NAMES)
            out.append(f"{a} {rng.choice(VERBS)} the {rng.choice(ANIMALS)} at the "
                       f"{rng.choice(PLACES)} with {rng.choice(NAMES)}.")
    return " ".join(out)


def _chat(rng: random.Random, n_turns: int) -> str:
    lines = []
    for _ in range(n_turns):
        q = rng.choice((
            f"User: {rng.choice(GREETINGS)}, how are you {rng.choice(TIMES)}?",
            f"User: Can you tell me a story about a {rng.choice(ADJS)} {rng.choice(ANIMALS)}?",
            f"User: What do you think about the {rng.choice(PLACES)}?",
            f"User: I like {rng.choice(('music', 'food', 'games', 'books'))}, do you?",
        ))
        a = rng.choice((
            f"Assistant: {rng.choice(GREETINGS)}, I am {rng.choice(('fine', 'good', 'happy'))}, "
            f"thanks. How was your day?",
            f"Assistant: Sure. The {rng.choice(ADJS)} {rng.choice(ANIMALS)} went to the "
            f"{rng.choice(PLACES)} and saw a {rng.choice(ADJS)} {rng.choice(OBJECTS)}.",
            f"Assistant: I think the {rng.choice(PLACES)} is very {rng.choice(ADJS)} "
            f"{rng.choice(TIMES)}.",
            f"Assistant: {rng.choice(GREETINGS)}, that sounds fun. Let us talk more about it.",
        ))
        lines += [q, a]
    return " ".join(lines)


def base_corpus(n: int, seed: int, max_boxes: int = 7, box_weights: tuple[float, ...] | None = None,
                tracking_frac: float = 0.8, all_queries: bool = False,
                n_queries: int | None = 1, aux_wording_frac: float = 0.0,
                gap_frac: float = 0.0) -> list[str]:
    """Pre-training documents: tracking in the evaluation wording mixed with generic prose.

    With ``all_queries`` every box of a context is queried once (random order); otherwise
    ``n_queries`` random queries (2-4 when None). One query per context is what lets binding
    emerge (measured): repeated queries let later answers be copied from earlier ones.
    ``aux_wording_frac``: the share of tracking contexts phrased in the auxiliary wordings
    (:func:`_tracking_aux_wording`) instead, with the same box counts (0: none, and the output is
    what it was before the option existed). ``gap_frac``: the share of evaluation-wording
    contexts with 1-3 prose sentences between the context and its queries (0: none).
    """
    rng = random.Random(seed)
    weights = list(box_weights or [1.0] * max_boxes)
    sizes = list(range(1, len(weights) + 1))
    docs = []
    for _ in range(n):
        if rng.random() < tracking_frac:
            k = rng.choices(sizes, weights)[0]
            if aux_wording_frac and rng.random() < aux_wording_frac:
                nq = rng.randint(2, 4) if n_queries is None else n_queries
                docs.append(_tracking_aux_wording(rng, k, nq))
            elif all_queries:
                docs.append(_tracking_eval_wording(rng, k, k + rng.randint(0, 2), distinct=True))
            else:
                nq = rng.randint(2, 4) if n_queries is None else n_queries
                gap = (_prose(rng, rng.randint(1, 3))
                       if gap_frac and rng.random() < gap_frac else "")
                docs.append(_tracking_eval_wording(rng, k, nq, gap=gap))
        else:
            docs.append(_prose(rng, rng.randint(2, 5)))
    return docs


def aux_corpus(n: int, seed: int, min_boxes: int = 3, max_boxes: int = 9,
               binding_frac: float = 0.25, styles: tuple[int, ...] | None = None) -> list[str]:
    """Fine-tuning documents for lora/full: binding-like data, never the evaluation wording.
    A ``binding_frac`` share is variable binding (``x = 5 ; print x -> 5``), the rest tracking in
    the auxiliary wordings (``styles``: see :func:`_tracking_aux_wording`)."""
    if styles is not None and (not styles or any(x not in range(4) for x in styles)):
        raise ValueError(f"styles must be a non-empty subset of 0-3, got {styles!r}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        k = rng.randint(min_boxes, max_boxes)
        if rng.random() < binding_frac:
            docs.append(_variable_binding(rng, k, rng.randint(2, 4)))
        else:
            docs.append(_tracking_aux_wording(rng, k, rng.randint(3, k + 1), styles))
    return docs


def chat_corpus(n: int, seed: int) -> list[str]:
    """Fine-tuning documents for chat: unrelated conversations."""
    rng = random.Random(seed)
    return [_chat(rng, rng.randint(1, 3)) for _ in range(n)]

