"""Cross-model comparison: head overlap between circuits, and every circuit on every model.

:func:`evaluate_matrix` is the engine behind ``circuitdiff evaluate``: models are loaded one at
a time; for each, its full accuracy, mean-ablation means and one :class:`FaithfulnessRow` per
circuit are cached in the run folder as they are made, so a killed run resumes (the model is still loaded, to check
circuit and tokenizer, but nothing cached is recomputed). All models must share a tokenizer — the same prompts
are then the same token ids for all — unless ``per_model_tokenization`` is set, in which case
each model gets prompts generated from the same seed with its own tokenizer.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from .ablation import model_tag, cached_means, safe_name
from .accuracy import evaluate_accuracy
from .circuit import Circuit
from .faithfulness import FaithfulnessRow, evaluate_faithfulness, short_name
from .model import LoadedModel
from .runs import RunFolder
from .task import EntityTrackingTask, TaskConfig


def head_overlap(reference: Circuit, other: Circuit) -> dict[str, dict]:
    """Per group (and ``"all"``): ``|A∩B|``, precision ``|A∩B|/|B|``, recall ``|A∩B|/|A|``.

    ``reference`` is A, ``other`` is B (read as a prediction of A). Groups missing from one
    circuit count as empty; a ratio over an empty set is ``None``.
    """
    ratio = lambda a, b: None if b == 0 else a / b  # noqa: E731
    out = {}
    names = list(dict.fromkeys(list(reference.groups) + list(other.groups)))
    for g in names + ["all"]:
        if g == "all":
            a, b = set(reference.heads()), set(other.heads())
        else:
            a = set(reference.groups[g].heads) if g in reference.groups else set()
            b = set(other.groups[g].heads) if g in other.groups else set()
        i = len(a & b)
        out[g] = {"intersection": i, "n_reference": len(a), "n_other": len(b),
                  "precision": ratio(i, len(b)), "recall": ratio(i, len(a))}
    return out


@dataclass
class EvalConfig:
    """Everything that decides the numbers of an evaluation (also the cache key)."""

    n_prompts: int = 500
    seed: int = 0
    n_boxes: int = 7
    n_mean: int = 500
    mean_seed: int | None = None      # default: seed + 1 (a set disjoint in draws from the prompts)
    n_random: int = 10
    random_seed: int = 0
    keep_other_positions: bool = False
    batch_size: int = 32
    max_rows: int = 256
    per_model_tokenization: bool = False

    def __post_init__(self) -> None:
        if self.mean_seed is None:
            self.mean_seed = self.seed + 1
        if self.mean_seed == self.seed:
            raise ValueError("the mean-ablation set must use another seed than the evaluation "
                             "prompts (mean_seed == seed)")
        for name in ("n_prompts", "n_mean", "batch_size", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def key(self) -> dict:
        d = asdict(self)
        d.pop("batch_size")
        d.pop("max_rows")
        return d


def same_tokenizer(a, b) -> bool:
    """Same vocabulary and same ids for a probe text (catches differing BOS handling)."""
    if a is b:
        return True
    probe = "The apple is in Box A, the book is in Box B. Box A contains the"
    return a.get_vocab() == b.get_vocab() and a(probe)["input_ids"] == b(probe)["input_ids"]


class ModelSession:
    """Per-model state while evaluating: the model (loaded on demand), prompts and means."""

    def __init__(self, spec: str, load: Callable[[str], LoadedModel], folder: RunFolder,
                 cfg: EvalConfig, progress: bool = False):
        self.spec, self._load, self.folder, self.cfg, self.progress = spec, load, folder, cfg, progress
        self._loaded: LoadedModel | None = None
        self.prompts = None
        self._means = None

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = self._load(self.spec)
        return self._loaded

    def bind_prompts(self, prompts, mean_prompts) -> None:
        self.prompts, self.mean_prompts = prompts, mean_prompts

    @property
    def means(self):
        if self._means is None:
            c = self.cfg
            self._means = cached_means(self.folder, self.loaded, self.mean_prompts,
                                       {"n_mean": c.n_mean, "mean_seed": c.mean_seed,
                                        "n_boxes": c.n_boxes,
                                        "per_model_tokenization": c.per_model_tokenization},
                                       c.batch_size, self.progress)
        return self._means

    def close(self) -> None:
        self._loaded = None
        self._means = None
        gc.collect()


def evaluate_matrix(circuits: dict[str, Circuit], models: Sequence[str],
                    load: Callable[[str], LoadedModel], folder: RunFolder,
                    cfg: EvalConfig | None = None, progress: bool = False,
                    per_model: Callable[[ModelSession, dict[str, FaithfulnessRow]], None] | None = None,
                    ) -> list[FaithfulnessRow]:
    """A :class:`FaithfulnessRow` for every (circuit, model) pair, cached per pair.

    ``load(spec)`` loads a model; ``per_model(session, rows)`` runs extra analyses
    (completeness, minimality...) while that model is loaded.
    """
    cfg = cfg or EvalConfig()
    if not circuits:
        raise ValueError("no circuit to evaluate")
    if not models:
        raise ValueError("no model to evaluate (pass --model at least once)")
    if len(set(models)) != len(models):
        raise ValueError(f"a model is listed twice: {list(models)}")
    rows: list[FaithfulnessRow] = []
    first_tok = None
    shared_prompts = None
    for spec in models:
        sess = ModelSession(spec, load, folder, cfg, progress)
        loaded = sess.loaded
        for c in circuits.values():
            c.validate(loaded.arch)
        tok = loaded.tokenizer
        task_cfg = TaskConfig(n_boxes=cfg.n_boxes)
        if first_tok is None or cfg.per_model_tokenization:
            task = EntityTrackingTask(tok, task_cfg, seed=cfg.seed)
            prompts = task.sample(cfg.n_prompts)
            mean_prompts = task.sample(cfg.n_mean, seed=cfg.mean_seed)
            if first_tok is None:
                first_tok, shared_prompts = tok, (prompts, mean_prompts)
        else:
            if not same_tokenizer(first_tok, tok):
                raise ValueError(
                    f"model {spec} has a different tokenizer from {models[0]}: the same prompts "
                    f"would be different token ids. Compare models with one tokenizer, or pass "
                    f"--per-model-tokenization to give each model its own prompts from the same "
                    f"seed")
            prompts, mean_prompts = shared_prompts
        sess.bind_prompts(prompts, mean_prompts)
        slug = model_tag(loaded.name)
        base = {"model": loaded.name, **cfg.key()}
        full = folder.cached(f"evaluate/{slug}/full.json", base, lambda: evaluate_accuracy(
            loaded, prompts, cfg.batch_size, progress).to_dict())["accuracy"]
        model_rows: dict[str, FaithfulnessRow] = {}
        for name, circuit in circuits.items():
            settings = {**base, "circuit": circuit.to_dict()}
            d = folder.cached(f"evaluate/{slug}/{safe_name(name)}.json", settings,
                              lambda: evaluate_faithfulness(
                                  loaded, prompts, sess.means, circuit, name, cfg.n_random,
                                  cfg.random_seed, cfg.keep_other_positions, cfg.batch_size,
                                  cfg.max_rows, full, progress).to_dict())
            model_rows[name] = FaithfulnessRow.from_dict(d)
        if per_model is not None:
            per_model(sess, model_rows)
        rows += list(model_rows.values())
        sess.close()
        del loaded
    return rows


def format_matrix(rows: Sequence[FaithfulnessRow]) -> str:
    """Circuit (rows) x model (columns): circuit accuracy (faithfulness)."""
    circuits = list(dict.fromkeys(r.circuit for r in rows))
    models = list(dict.fromkeys(r.model for r in rows))
    at = {(r.circuit, r.model): r for r in rows}
    cell = lambda r: "-" if r is None else (  # noqa: E731
        f"{r.circuit_accuracy:.2f} ({'undef' if r.faithfulness is None else f'{r.faithfulness:.2f}'})")
    head = ["circuit \\ model"] + [short_name(m) for m in models]
    body = [[c] + [cell(at.get((c, m))) for m in models] for c in circuits]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])
