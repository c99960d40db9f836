"""The whole study on the shipped organisms (base + its LoRA fine-tune, laptop-small settings),
and its report opened in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import re

import pytest

from circuitdiff.cli import main
from circuitdiff.report.browser import check_page

pytestmark = pytest.mark.slow  # a whole study on the organisms (~2 min): the slow tier


@pytest.fixture(scope="module")
def organism_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("organisms") / "study"
    rc = main(["study", "--model", "organism:base", "--model", "organism:chat", "--model",
               "organism:lora", "--model", "organism:full", "--out", str(out), "-n", "60", "--n-discovery", "100", "--n-mean", "60",
               "--random-draws", "3", "--dcm-train", "60", "--quiet"])
    assert rc == 0
    return out, json.loads((out / "summary.json").read_text())


def test_study_finds_the_lookback_and_judges_the_fine_tune(organism_study):
    out, s = organism_study
    assert s["accuracy"]["organism:lora"]["accuracy"] > s["accuracy"]["organism:base"]["accuracy"]
    positions = {g["position"] for g in s["circuit"]["groups"].values() if g["heads"]}
    assert "last" in positions and positions & {"labels", "separators"}  # reads at the labels
    v = s["verdicts"]["organism:lora"]
    assert {k: d["answer"] in ("yes", "no", "undecided") for k, d in v.items()} == {
        "uses_base_circuit": True, "same_functions": True, "gain_carried": True}
    assert all(d["rule"] and d["evidence"] for d in v.values())
    # the fine-tune's gain over the base is real here, so CMAP decides: a number, an interval
    cm = s["cmap"]["organism:lora"]["directions"][0]
    assert cm["gap_ci"][0] > 0
    assert "own_circuits" in s and s["own_circuits"]["organism:lora"]["overlap"]["n_reference"] > 0


def test_verdicts_follow_the_data_and_their_nulls(organism_study):
    """lora and full gained (≈ +0.4) through the base circuit; chat gained nothing, so there is
    nothing to carry. Every verdict carries its null and its calibration on random circuits."""
    _, s = organism_study
    v = s["verdicts"]
    assert v["organism:chat"]["gain_carried"]["answer"] == "undecided"
    for ft in ("organism:lora", "organism:full"):
        g = v[ft]["gain_carried"]
        assert g["answer"] in ("yes", "undecided"), g["evidence"]
        assert g["numbers"]["share"] > g["numbers"]["random_share"] + 0.1
        # the permutation rank among CMAP's 20 random circuits is part of the rule: yes needs
        # p = rank / 21 <= 0.05, i.e. rank 1
        n = g["numbers"]
        assert n["draws"] == 20 and n["rank_p"] == n["rank"] / 21
        assert g["answer"] != "yes" or n["rank"] == 1
        cal = g["calibration"]
        assert cal["draws"] == 20  # CMAP's 20 random draws, each judged against the other 19
        assert cal["yes"] <= 3, cal  # a 5 % rule: about 1 of 20 (4 or more: p ≈ 0.016)
        assert g["flagged"] == (cal["yes"] > 0)
        u = v[ft]["uses_base_circuit"]
        assert u["answer"] in ("yes", "undecided"), u["evidence"]
        assert u["numbers"]["null_p"] < 0.05 and u["numbers"]["ceiling"] is not None
        assert u["calibration"]["yes"] == 0  # random circuits of the base's shape never pass


def test_report_renders_in_chromium_with_every_figure_and_table(organism_study, chromium):
    browser = chromium
    out, s = organism_study
    html = (out / "report.html").read_text()
    n_img = len(re.findall(r"<img ", html))
    assert n_img >= 10  # diagrams, scan, curve, graph, faithfulness, knockout x2, DCM, CMAP...
    for section in ("Summary and verdicts", "The base circuit", "Faithfulness on every model",
                    "Attention knockout", "DCM: what each group encodes", "CMAP", "Definitions",
                    "Settings, versions, seeds and timings"):
        assert section in html, section
    res = check_page(out / "report.html", out / "report_check.png", browser)
    assert res.ok, res
    assert res.images == res.images_ok == n_img
    assert res.table_rows and all(n > 0 for n in res.table_rows)
    # the study itself left a screenshot of the first screen in the run folder
    assert (out / "report.png").stat().st_size > 20_000
