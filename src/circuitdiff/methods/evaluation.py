"""Cross-model comparison: head overlap between circuits, and every circuit on every model.

:func:`run` is the engine behind ``circuitdiff evaluate`` and the study's faithfulness step: the
models of a :class:`~circuitdiff.core.pool.ModelPool` are loaded one at a time; for each, its
full accuracy, mean-ablation means and one :class:`FaithfulnessRow` per circuit of the config
are cached in the run folder as they are made, so a killed run resumes (the model is still
loaded, to check circuit and tokenizer, but nothing cached is recomputed). All models must share
a tokenizer — the same prompts are then the same token ids for all — unless
``per_model_tokenization`` is set, in which case each model gets prompts generated from the
same seed with its own tokenizer.

Completeness (:func:`~circuitdiff.methods.completeness.completeness`) and minimality
(:func:`~circuitdiff.methods.minimality.minimality`) are helper functions this run calls while a
model is loaded, when the config's :class:`AnalysisConfig` asks; they have no ``run`` of their
own (they need the means and prompts of an evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..core.circuit import Circuit
from ..core.config import Config, check_finite, execution
from ..core.model import LoadedModel
from ..core.pool import ModelPool, as_pool, same_tokenizer, tokenizer_digest
from ..core.runs import RunFolder, model_tag, safe_name, split_pieces
from ..core.task import EntityTrackingTask, Prompt, TaskConfig, TaskSample
from .ablation import HeadMeans, cached_means
from .accuracy import evaluate_accuracy, prompts_key
from .base import Result, as_store
from .completeness import CompletenessPoint, completeness
from .faithfulness import FaithfulnessRow, check_circuit, evaluate_faithfulness, random_draw_key
from .minimality import batched_evaluator, minimality


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
class AnalysisConfig(Config):
    """Optional analyses run while each model is loaded.

    ``completeness``: F(C∖K) vs F(M∖K) per circuit and model, over whole groups and
    ``n_halves`` random halves; ``minimality``: prune each circuit on the first model, keeping a
    head whose best marginal effect is ≥ ``threshold`` with partner sets of at most
    ``max_partner_frac`` of its group.
    """

    completeness: bool = False
    n_halves: int = 5
    minimality: bool = False
    threshold: float = 0.01
    max_partner_frac: float = 0.3

    def __post_init__(self) -> None:
        check_finite("minimality", threshold=self.threshold,
                     max_partner_frac=self.max_partner_frac)
        if not 0 <= self.max_partner_frac <= 1:
            raise ValueError(f"--max-partner-frac must be in [0, 1], got {self.max_partner_frac}")
        if self.n_halves < 0:
            raise ValueError(f"--n-halves must be >= 0, got {self.n_halves}")


@dataclass
class EvalConfig(TaskSample):
    """Everything that decides the numbers of an evaluation.

    ``n_prompts`` evaluation prompts of ``n_boxes`` boxes drawn with ``seed`` (:class:`TaskSample`,
    the first three fields); means over
    ``n_mean`` prompts drawn with ``mean_seed`` (default ``seed + 1``: a set disjoint in draws);
    ``n_random`` random circuits of each circuit's group sizes, drawn with ``random_seed``;
    ``keep_other_positions`` makes that protocol the table's main one (both are reported);
    ``per_model_tokenization`` gives each model its own prompts from the same seed (models with
    different tokenizers); ``circuits`` the circuits evaluated, by name; ``analyses`` the
    optional completeness and minimality. ``batch_size``/``max_rows``: prompts per batch and rows
    per stacked forward (execution only).
    """

    n_mean: int = 500
    mean_seed: int | None = None
    n_random: int = 10
    random_seed: int = 0
    keep_other_positions: bool = False
    batch_size: int = execution(32)
    max_rows: int = execution(256)
    per_model_tokenization: bool = False
    circuits: dict[str, Circuit] = field(default_factory=dict)
    analyses: AnalysisConfig = field(default_factory=AnalysisConfig)

    def __post_init__(self) -> None:
        if self.mean_seed is None:
            self.mean_seed = self.seed + 1
        if self.mean_seed == self.seed:
            raise ValueError("the mean-ablation set must use another seed than the evaluation "
                             "prompts (mean_seed == seed)")
        self.check_at_least(("n_prompts", "n_mean", "batch_size", "max_rows"))
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, got {self.n_random}")
        self.circuits = {str(k): Circuit.from_dict(c) if isinstance(c, dict) else c
                         for k, c in self.circuits.items()}
        for name, c in self.circuits.items():
            check_circuit(c, f"circuit {name!r}")
        if isinstance(self.analyses, dict):
            self.analyses = AnalysisConfig.from_dict(self.analyses)

    def shared_key(self) -> dict:
        """The settings every cached piece shares: the key without the circuits and the analyses
        (each piece adds its own circuit and analysis settings)."""
        key = self.cache_key()
        key.pop("circuits")
        key.pop("analyses")
        return key

    def means_key(self) -> dict:
        """The settings the mean-ablation means depend on."""
        return {k: getattr(self, k) for k in ("n_mean", "mean_seed", "n_boxes",
                                              "per_model_tokenization")}


@dataclass
class EvaluationResult(Result):
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

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluationResult":
        return cls([FaithfulnessRow.from_dict(r) for r in d["rows"]],
                   {tuple(k.split("|", 1)): [CompletenessPoint.from_dict(p) for p in pts]
                    for k, pts in d.get("completeness", {}).items()},
                   d.get("minimality", {}), d.get("overlaps", {}))


TOKENIZER_FIX = ("the same prompts would be different token ids. Compare models with one "
                 "tokenizer, or pass --per-model-tokenization to give each model its own prompts "
                 "from the same seed")


def check_same_tokenizer(first_spec: str, first_tokenizer, spec: str, tokenizer) -> None:
    """Error unless ``spec``'s tokenizer is the first model's: shared prompts would otherwise be
    different token ids (the fix: one tokenizer, or ``per_model_tokenization``)."""
    if not same_tokenizer(first_tokenizer, tokenizer):
        raise ValueError(f"model {spec} has a different tokenizer from {first_spec}: "
                         f"{TOKENIZER_FIX}")


def _cached(folder: RunFolder | None, name: str, settings: dict, compute):
    return compute() if folder is None else folder.cached(name, settings, compute)


def run(model_or_pool: "LoadedModel | ModelPool", prompts: Sequence[Prompt] | None,
        config: EvalConfig, *, store: "RunFolder | str | None" = None,
        progress: bool | None = None) -> EvaluationResult:
    """Every circuit of ``config`` on every model of the pool: a :class:`FaithfulnessRow` per
    (circuit, model), plus completeness and minimality when ``config.analyses`` asks, and head
    overlaps between circuits.

    ``prompts`` (default: the config's ``n_prompts`` prompts per tokenizer) are the evaluation
    prompts. Each piece is cached in ``store`` (``evaluate/<model>/full_hits.json``,
    ``evaluate/<model>/<circuit>.json``, ``means/…``, ``completeness/<model>/<circuit>.json``,
    ``minimality/<circuit>.json``, with ``pruned/<circuit>.json`` and ``overlap.json``
    beside them), so a rerun resumes. Under ``torchrun`` each rank evaluates its contiguous
    share of the (model, circuit) pairs, model-major
    (:func:`~circuitdiff.core.runs.split_pieces`; a model whose pairs straddle two shares is
    loaded, and its means computed, on both); the pieces are gathered in pair order and rank 0
    alone writes them.
    """
    cfg, an, circuits = config, config.analyses, config.circuits
    progress = bool(progress)
    if not circuits:
        raise ValueError("no circuit to evaluate (EvalConfig.circuits is empty)")
    pool = as_pool(model_or_pool)
    models = pool.specs
    if not models:
        raise ValueError("no model to evaluate (pass --model at least once)")
    if len(set(models)) != len(models):
        raise ValueError(f"a model is listed twice: {list(models)}")
    folder = as_store(store)
    names = list(circuits)
    units = [(spec, name) for spec in models for name in names]  # model-major: one load each
    state: dict = {}  # this rank's loaded model and what its pieces share
    first: list = []  # (spec, tokenizer, prompts, mean prompts) of this rank's first model

    def model_state(spec: str, store: RunFolder | None) -> dict:
        if state.get("spec") == spec:
            return state
        state.clear()
        loaded = pool.get(spec)
        for c in circuits.values():
            c.validate(loaded.arch)
        tok = loaded.tokenizer
        if not first or cfg.per_model_tokenization:
            task = EntityTrackingTask(tok, TaskConfig(n_boxes=cfg.n_boxes), seed=cfg.seed)
            ps = task.sample(cfg.n_prompts) if prompts is None else list(prompts)
            mean_ps = task.sample(cfg.n_mean, seed=cfg.mean_seed)
            if not first:
                first.append((spec, tok, ps, mean_ps))
        else:
            check_same_tokenizer(first[0][0], first[0][1], spec, tok)
            ps, mean_ps = first[0][2:]
        means: list[HeadMeans] = []

        def get_means() -> HeadMeans:  # computed only when a piece is not cached
            if not means:
                means.append(cached_means(store, loaded, mean_ps, cfg.means_key(),
                                          cfg.batch_size, progress))
            return means[0]

        slug = model_tag(loaded.name)
        base = {"model": loaded.name, **cfg.shared_key(), **prompts_key(prompts)}
        full_hits = _cached(store, f"evaluate/{slug}/full_hits.json", base, lambda: [
            int(x) for x in evaluate_accuracy(loaded, ps, cfg.batch_size, progress).correct])
        state.update(spec=spec, loaded=loaded, ps=ps, get_means=get_means, slug=slug, base=base,
                     full_hits=full_hits, tokenizer=tokenizer_digest(tok))
        return state

    def one_pair(i: int, store: RunFolder | None) -> dict:
        spec, name = units[i]
        m = model_state(spec, store)
        loaded, ps, get_means, slug = m["loaded"], m["ps"], m["get_means"], m["slug"]
        circuit = circuits[name]
        per_circuit = {**m["base"], "circuit": circuit.to_dict(), **random_draw_key(circuit)}
        out = {"model": loaded.name, "tokenizer": m["tokenizer"]}
        out["row"] = _cached(store, f"evaluate/{slug}/{safe_name(name)}.json",
                             {**per_circuit, "row_version": FaithfulnessRow.VERSION},
                             lambda: evaluate_faithfulness(
                                 loaded, ps, get_means(), circuit, name, cfg.n_random,
                                 cfg.random_seed, cfg.keep_other_positions, cfg.batch_size,
                                 cfg.max_rows, m["full_hits"], progress).to_dict())
        if an.completeness:
            out["completeness"] = _cached(
                store, f"completeness/{slug}/{safe_name(name)}.json",
                {**per_circuit, "n_halves": an.n_halves}, lambda: [
                    p.to_dict() for p in completeness(
                        loaded, ps, get_means(), circuit, an.n_halves, cfg.random_seed,
                        cfg.keep_other_positions, cfg.batch_size, cfg.max_rows, progress)])
        if an.minimality and spec == models[0]:
            out["minimality"] = _cached(
                store, f"minimality/{safe_name(name)}.json",
                {**per_circuit, "threshold": an.threshold, "max_partner_frac": an.max_partner_frac},
                lambda: minimality(circuit, batched_evaluator(
                    loaded, ps, get_means(), cfg.keep_other_positions, cfg.batch_size,
                    cfg.max_rows, progress=progress), an.threshold, an.max_partner_frac).to_dict())
        return out

    # under torchrun each rank evaluates its share of the (model, circuit) pairs alone; the
    # pieces come back in pair order, rank 0 writes them
    try:
        pieces = split_pieces(folder, len(units), one_pair,
                              cached_under=["evaluate/", "completeness/", "minimality/", "means/"])
    finally:
        state.clear()
        pool.free()
    if not cfg.per_model_tokenization:  # ranks saw different models: compare their tokenizers
        for (spec, _), piece in zip(units, pieces):
            if piece["tokenizer"] != pieces[0]["tokenizer"]:
                raise ValueError(f"model {spec} has a different tokenizer from {models[0]}: "
                                 f"{TOKENIZER_FIX}")
    result = EvaluationResult([])
    for (spec, name), piece in zip(units, pieces):
        result.rows.append(FaithfulnessRow.from_dict(piece["row"]))
        if "completeness" in piece:
            result.completeness[(piece["model"], name)] = [CompletenessPoint.from_dict(p)
                                                           for p in piece["completeness"]]
        if "minimality" in piece:
            res = result.minimality[name] = piece["minimality"]
            if folder is not None:
                Circuit.from_dict(res["pruned"]).save(folder.file(f"pruned/{safe_name(name)}.json"))
    if len(circuits) > 1:
        names = list(circuits)
        result.overlaps = {f"{a}|{b}": head_overlap(circuits[a], circuits[b])
                           for a in names for b in names if a != b}
        if folder is not None:
            folder.save_json("overlap.json", result.overlaps)
    return result


__all__ = ["AnalysisConfig", "EvalConfig", "EvaluationResult", "check_same_tokenizer",
           "head_overlap", "run", "same_tokenizer"]
