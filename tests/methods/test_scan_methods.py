"""The scan's and discovery's methods for models too big to scan exactly: the attribution scan
against its finite-difference twin, its identity, the hybrid against the exact scan, the rules
``auto`` resolves to by model size, the attribution's standard errors against per-prompt
estimates, and the bisect sizing's search."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama
from circuitdiff.core.arch import resolve
from circuitdiff.core.interventions import Hook
from circuitdiff.core.metrics import last_logits
from circuitdiff.core.model import LoadedModel
from circuitdiff.core.task import EntityTrackingTask, TaskConfig, encode
from circuitdiff.methods.ablation import HeadMeans, compute_means, role_mask
from circuitdiff.methods.discovery import DiscoveryConfig
from circuitdiff.methods.discovery.sizing import _bisect_grow
from circuitdiff.methods.path_patching import PatchRequest, attribution_scores
from circuitdiff.methods.scan import (AUTO_EXACT_MAX_HEADS, ScanConfig, ScanError,
                                      attribution_scan, position_scan, resolve_scan_method,
                                      scan_by_method)

torch.set_num_threads(1)
ROLES = ["objects", "labels", "query_label", "last"]


@pytest.fixture(scope="module")
def setup(tokenizer):
    m = tiny_llama(len(tokenizer), seed=3, layers=3, heads=4, kv_heads=2).double()
    loaded = LoadedModel(m, tokenizer, resolve(m), "tiny-double")
    task = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=3), seed=0)
    prompts = task.sample(6)
    means = compute_means(loaded, task.sample(12, seed=9), batch_size=12)
    return loaded, prompts, means


def _mean_logp(loaded, prompts, edits=()) -> float:
    batch = encode(prompts, loaded.tokenizer)
    with torch.no_grad():
        logits = last_logits(loaded, batch, list(edits(batch)) if callable(edits) else [])
    lp = logits.double().log_softmax(-1)  # float64 all the way (answer_prob rounds to float32)
    return float(lp.gather(-1, batch.answer_ids[:, None])[:, 0].mean())


def test_attribution_scan_is_the_derivative_of_the_mean_ablation(setup):
    """Naive twin: move layer l's head outputs at role r a step eps towards their means and
    difference the mean log p(answer); divided by eps it must match the estimate (float64
    weights; RMSNorm still rounds to float32, so eps is 1e-3, not smaller)."""
    loaded, prompts, means = setup
    est = attribution_scan(loaded, prompts, means, ROLES, batch_size=4)
    assert est.shape == (3, len(ROLES)) and est.abs().max() > 1e-3
    eps = 1e-3
    base = _mean_logp(loaded, prompts)
    for layer in range(3):
        for j, role in enumerate(ROLES):
            def edits(batch, layer=layer, role=role):
                at = role_mask(batch, role)[:, :, None, None]
                mu = means.means[layer][None].to(torch.float64)

                def fn(x4):
                    return torch.where(at, x4 + eps * (mu - x4), x4)
                return [Hook(layer, fn)]
            fd = (_mean_logp(loaded, prompts, edits) - base) / eps
            assert est[layer, j] == pytest.approx(fd, rel=2e-2, abs=2e-5), (layer, role)


def test_attribution_scan_identity_means_equal_to_the_activations(setup):
    """Means taken on the very prompt scanned: every replacement is the identity, every
    estimate 0."""
    loaded, prompts, _ = setup
    own = compute_means(loaded, prompts[:1], batch_size=1)
    est = attribution_scan(loaded, prompts[:1], own, ROLES, batch_size=1)
    assert est.abs().max() <= 1e-7  # the means are stored in float32


def test_hybrid_scan_measures_the_top_cells_exactly_and_leaves_the_rest_unmeasured(setup):
    loaded, prompts, means = setup
    exact = position_scan(loaded, prompts, means, ROLES, batch_size=6)
    hybrid = scan_by_method(loaded, prompts, means, ROLES, "hybrid", n_exact=3, batch_size=4)
    est = torch.tensor(hybrid.estimate)
    top = set(torch.argsort(est.flatten(), stable=True)[:3].tolist())
    acc, ref = torch.tensor(hybrid.accuracy), torch.tensor(exact.accuracy)
    for i in range(acc.numel()):
        l, r = divmod(i, len(ROLES))
        if i in top:
            assert acc[l, r] == ref[l, r]          # measured cells: the exact scan's values
        else:
            assert math.isnan(acc[l, r])
    assert hybrid.baseline == exact.baseline and hybrid.method == "hybrid"
    # an unmeasured cell never counts as relevant, a measured one as the exact scan says
    measured_roles = {ROLES[i % len(ROLES)] for i in top}
    import dataclasses

    single = dataclasses.replace(hybrid, cumulative=None)  # the single-layer rule alone
    assert set(single.relevant_roles(3, 0.0)) <= measured_roles
    only = scan_by_method(loaded, prompts, means, ROLES, "attribution", batch_size=4)
    assert all(math.isnan(a) for row in only.accuracy for a in row)
    assert only.relevant_roles(3, 0.0) == [] and only.estimate == hybrid.estimate


def test_auto_resolves_by_model_size_and_says_why():
    assert resolve_scan_method("auto", 4, 8, 7, 16)[0] == "exact"
    method, rule = resolve_scan_method("auto", 24, 14, 7, 16)
    assert method == "hybrid" and "336 heads > 160" in rule and "16" in rule
    assert resolve_scan_method("exact", 24, 14, 7, 16)[0] == "exact"
    small, rules = DiscoveryConfig().resolved(4, 8)
    assert (small.method, small.sizing) == ("exact", "exhaustive") and len(rules) == 2
    big, rules = DiscoveryConfig().resolved(24, 14)
    assert (big.method, big.sizing) == ("attribution", "bisect")
    assert all("336 heads > 160" in r for r in rules)
    kept, rules = DiscoveryConfig(method="hybrid", sizing="exhaustive").resolved(24, 14)
    assert (kept.method, kept.sizing, rules) == ("hybrid", "exhaustive", [])
    assert AUTO_EXACT_MAX_HEADS >= 32
    with pytest.raises(ScanError, match="scan method"):
        ScanConfig(method="fast")


def test_attribution_standard_error_is_the_spread_of_per_prompt_estimates(setup):
    loaded, prompts, _ = setup
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=3), seed=0)
    cf = task.corrupt(prompts)
    req = PatchRequest("last", [(2, 1)], "q")
    mean, se = attribution_scores(loaded, prompts, cf, req, batch_size=4, with_se=True)
    per = torch.stack([attribution_scores(loaded, [c], [x], req, batch_size=1)
                       for c, x in zip(prompts, cf)]).double()
    assert torch.allclose(mean.double(), per.mean(0), atol=1e-6)
    assert torch.allclose(se.double(), per.std(0) / len(prompts) ** 0.5, atol=1e-6)
    assert se[:2].max() > 0
    assert torch.equal(mean, attribution_scores(loaded, prompts, cf, req, batch_size=4))


@pytest.mark.parametrize("first_hit", [0, 1, 5, 17, 39])
def test_bisect_sizing_finds_the_first_prefix_over_the_target(first_hit):
    calls = []

    def measure(j):
        calls.append(j)
        f = 1.0 if j >= first_hit else 0.5
        return (f, f, f)
    got = _bisect_grow(40, measure, 0.9)
    assert min(j for j, v in got.items() if v[2] >= 0.9) == first_hit
    assert len(calls) == len(set(calls)) <= 2 * math.ceil(math.log2(40)) + 1


def test_bisect_sizing_without_a_hit_measures_up_to_every_candidate():
    got = _bisect_grow(10, lambda j: (0.1, 0.1, 0.1), 0.9)
    assert max(got) == 9 and all(v[2] < 0.9 for v in got.values())


def test_attribution_with_a_capture_cache_reuses_the_reads_and_scores_the_same(setup):
    from circuitdiff.methods.path_patching import CaptureCache

    loaded, prompts, _ = setup
    cf = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=3), seed=0).corrupt(prompts)
    cache = CaptureCache()
    plain = attribution_scores(loaded, prompts, cf, PatchRequest("last", [], "q"), batch_size=4)
    first = attribution_scores(loaded, prompts, cf, PatchRequest("last", [], "q"), batch_size=4,
                               cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    second = attribution_scores(loaded, prompts, cf, PatchRequest("last", [(2, 1)], "q"),
                                batch_size=4, cache=cache)
    assert (cache.hits, cache.misses) == (2, 2)
    assert torch.equal(plain, first)
    assert torch.equal(second, attribution_scores(loaded, prompts, cf,
                                                  PatchRequest("last", [(2, 1)], "q"),
                                                  batch_size=4))
    labels = PatchRequest("labels", [(2, 1)], "k")  # another role: the same captures serve it
    third = attribution_scores(loaded, prompts, cf, labels, batch_size=4, cache=cache)
    assert (cache.hits, cache.misses) == (4, 2)
    assert torch.equal(third, attribution_scores(loaded, prompts, cf, labels, batch_size=4))


def test_hybrid_cumulative_rows_ablate_a_role_at_every_layer(setup):
    import dataclasses

    """Oracle: every layer's head outputs at the role replaced by their means with plain hooks;
    a role relevant only together (no single measured layer) counts as relevant."""
    from circuitdiff.core.metrics import correct

    loaded, prompts, means = setup
    hybrid = scan_by_method(loaded, prompts, means, ROLES, "hybrid", n_exact=1, batch_size=4)
    assert len(hybrid.cumulative) == len(ROLES)
    batch = encode(prompts, loaded.tokenizer)
    for j, role in enumerate(ROLES):
        at = role_mask(batch, role)[:, :, None, None]
        edits = [Hook(l, lambda x4, l=l: torch.where(at, means.means[l][None].to(x4.dtype), x4))
                 for l in range(3)]
        with torch.no_grad():
            acc = float(correct(last_logits(loaded, batch, edits), batch).double().mean())
        assert hybrid.cumulative[j] == pytest.approx(acc)
    from circuitdiff.methods.scan import ScanResult

    nan = float("nan")
    res = ScanResult("m", ["labels", "last"], [[0.95, nan], [nan, 0.5]], 1.0, 10,
                     cumulative=[0.6, 0.5])
    assert res.relevant_roles(2, 0.3) == ["last", "labels"]  # labels: only together
    assert res.relevant_roles(1, 0.3) == ["last", "labels"]  # cumulative spans every layer
    assert dataclasses.replace(res, cumulative=None).relevant_roles(2, 0.3) == ["last"]
