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
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from .ablation import cached_means
from .accuracy import evaluate_accuracy
from ..core.circuit import Circuit
from .faithfulness import FaithfulnessRow, evaluate_faithfulness
from ..core.model import LoadedModel
from ..core.runs import RunFolder, model_tag, safe_name
from ..core.task import EntityTrackingTask, TaskConfig


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
        full_hits = folder.cached(f"evaluate/{slug}/full_hits.json", base, lambda: [
            int(x) for x in evaluate_accuracy(loaded, prompts, cfg.batch_size, progress).correct])
        model_rows: dict[str, FaithfulnessRow] = {}
        for name, circuit in circuits.items():
            # row_version 2: rows carry per-prompt hits and the faithfulness interval
            settings = {**base, "circuit": circuit.to_dict(), "row_version": 2}
            d = folder.cached(f"evaluate/{slug}/{safe_name(name)}.json", settings,
                              lambda: evaluate_faithfulness(
                                  loaded, prompts, sess.means, circuit, name, cfg.n_random,
                                  cfg.random_seed, cfg.keep_other_positions, cfg.batch_size,
                                  cfg.max_rows, full_hits, progress).to_dict())
            model_rows[name] = FaithfulnessRow.from_dict(d)
        if per_model is not None:
            per_model(sess, model_rows)
        rows += list(model_rows.values())
        sess.close()
        del loaded
    return rows


@dataclass
class AnalysisConfig:
    """Optional per-model analyses run while each model is loaded (also part of cache keys)."""

    completeness: bool = False
    n_halves: int = 5
    minimality: bool = False          # on the first model only
    threshold: float = 0.01
    max_partner_frac: float = 0.3

    def __post_init__(self) -> None:
        if not 0 <= self.max_partner_frac <= 1:
            raise ValueError(f"--max-partner-frac must be in [0, 1], got {self.max_partner_frac}")


@dataclass
class EvaluationResult:
    """Faithfulness rows, and what the optional analyses found.

    ``completeness[(model, circuit)]`` is a list of :class:`CompletenessPoint`;
    ``minimality[circuit]`` is the saved minimality dict (pruned circuit, scores, variants);
    ``overlaps["A|B"]`` is :func:`head_overlap` of circuit A (reference) and B.
    """

    rows: list[FaithfulnessRow]
    completeness: dict[tuple[str, str], list] = field(default_factory=dict)
    minimality: dict[str, dict] = field(default_factory=dict)
    overlaps: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows],
                "completeness": {f"{m}|{c}": [p.to_dict() for p in pts]
                                 for (m, c), pts in self.completeness.items()},
                "minimality": self.minimality, "overlaps": self.overlaps}


def evaluate(circuits: dict[str, Circuit], models: Sequence[str],
             load: Callable[[str], LoadedModel], folder: RunFolder,
             cfg: EvalConfig | None = None, analyses: AnalysisConfig | None = None,
             progress: bool = False) -> EvaluationResult:
    """Every circuit on every model (:func:`evaluate_matrix`), plus completeness and minimality
    when ``analyses`` asks, and head overlaps between circuits. Each piece is cached in
    ``folder`` (``completeness/<model>/<circuit>.json``, ``minimality/<circuit>.json``,
    ``pruned/<circuit>.json``, ``overlap.json``), so a rerun resumes."""
    from .completeness import CompletenessPoint, completeness
    from .minimality import batched_evaluator, minimality

    cfg = cfg or EvalConfig()
    an = analyses or AnalysisConfig()
    result = EvaluationResult([])

    def extra(sess: ModelSession, rows) -> None:
        loaded = sess.loaded
        slug = model_tag(loaded.name)
        base = {"model": loaded.name, **cfg.key()}
        for name, circuit in circuits.items():
            if an.completeness:
                s = {**base, "circuit": circuit.to_dict(), "n_halves": an.n_halves}
                pts = folder.cached(f"completeness/{slug}/{safe_name(name)}.json", s, lambda: [
                    p.to_dict() for p in completeness(
                        loaded, sess.prompts, sess.means, circuit, an.n_halves, cfg.random_seed,
                        cfg.keep_other_positions, cfg.batch_size, cfg.max_rows, progress)])
                result.completeness[(loaded.name, name)] = [
                    CompletenessPoint(p["subset"], p["removed"], p["circuit_minus_k"],
                                      p["model_minus_k"]) for p in pts]
            if an.minimality and sess.spec == models[0]:
                s = {**base, "circuit": circuit.to_dict(), "threshold": an.threshold,
                     "max_partner_frac": an.max_partner_frac}
                res = folder.cached(f"minimality/{safe_name(name)}.json", s, lambda: minimality(
                    circuit, batched_evaluator(loaded, sess.prompts, sess.means,
                                               cfg.keep_other_positions, cfg.batch_size,
                                               cfg.max_rows, progress=progress),
                    an.threshold, an.max_partner_frac).to_dict())
                Circuit.from_dict(res["pruned"]).save(folder.file(f"pruned/{safe_name(name)}.json"))
                result.minimality[name] = res

    result.rows = evaluate_matrix(circuits, models, load, folder, cfg, progress,
                                  per_model=extra if (an.completeness or an.minimality) else None)
    if len(circuits) > 1:
        names = list(circuits)
        result.overlaps = {f"{a}|{b}": head_overlap(circuits[a], circuits[b])
                           for a in names for b in names if a != b}
        folder.save_json("overlap.json", result.overlaps)
    return result
