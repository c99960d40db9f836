"""The study's markdown summary and the text tables are built from saved results alone."""

from __future__ import annotations

from circuitdiff.report.markdown import study_report
from circuitdiff.report.tables import format_overlaps


def _summary():
    return {
        "models": ["m0", "m1"],
        "config": {"evaluation": {"n_boxes": 3, "n_prompts": 8, "seed": 0}},
        "circuit": {"n_layers": 2, "n_heads": 2, "model": "m0", "settings": {},
                    "groups": {"value_fetcher": {"position": "last", "heads": ["1.0"]},
                               "structure_reader": {"position": "prev_query_label",
                                                    "heads": []}}},
        "knockout": {"m0": {"last->correct_object": {"baseline": 0.5, "layers": [0, 1],
                                                     "accuracy": [0.1, 0.4], "n": 4}}},
        "verdicts": {"m1": {"gain_carried": {"answer": "undecided", "rule": "r",
                                             "evidence": "gap +0.01 [-0.02, 0.04]"}}},
        "faithfulness": [{"model": "m0", "circuit": "base_circuit", "full": 0.5,
                          "circuit_accuracy": 0.25, "random_mean": 0.0, "random_sd": 0.0,
                          "faithfulness": 0.5, "n": 8, "random": [0.0]}],
    }


def test_study_report_sections():
    md = study_report(_summary())
    assert "3 boxes, 8 evaluation prompts, seed 0" in md
    assert "**value_fetcher** @ `last`: 1.0" in md
    assert "**structure_reader** @ `prev_query_label`: (empty)" in md
    assert "L=0: 0.10, L=1: 0.40" in md
    # knockout ran on fewer prompts than the accuracy table: the report says why they differ
    assert "Knockout uses the first 4 of the 8 evaluation prompts" in md
    assert "**m1** — gain carried: **undecided** — gap +0.01" in md
    assert "| 0.50" in md and "0.25" in md


def test_study_page_explains_what_a_reader_would_ask(tmp_path):
    from circuitdiff.report.study_html import DEFINITIONS, build_study_page

    s = _summary()
    s["accuracy"] = {"m0": {"accuracy": 0.5, "in_context_accuracy": 0.6, "n": 8,
                            "chance": 1 / 3}}
    s["faithfulness"][0]["circuit_accuracy"] = 0.0
    html = build_study_page(s, tmp_path).render()
    assert "class='verdict undecided'" in html and "Decision rules" in html
    from circuitdiff.methods.verdicts import VerdictRules
    from circuitdiff.report.html import esc

    for row in VerdictRules().table():  # the rules, once, in the rules table
        assert html.count(f"<td>{esc(row['threshold'])}</td>") == 1
    assert "at or below its random baseline" in html and "below chance" in html
    assert "Empty groups (structure_reader)" in html
    assert all(term in html for term in DEFINITIONS)
    assert "first 4 of the 8 evaluation prompts" in html


def test_accuracy_only_report():
    s = {"models": ["m0"], "config": {"evaluation": {"n_boxes": 7, "n_prompts": 4, "seed": 1}},
         "accuracy": {"m0": {"accuracy": 0.25, "in_context_accuracy": 0.5, "n": 4}}}
    assert "m0: 7-box accuracy 0.250 (in-context 0.500, n=4)" in study_report(s)


def test_format_overlaps():
    ov = {"a|b": {"all": {"intersection": 1, "n_reference": 2, "precision": 0.5,
                          "recall": None}}}
    assert format_overlaps(ov) == "overlap a (reference) vs b: all 1/2 (P 0.50 R -)"


def test_each_rule_printed_once(tmp_path):
    """Nine verdicts over three fine-tunes share three rules: the page prints each rule once
    (a rules table), not under every verdict."""
    from circuitdiff.report.study_html import build_study_page

    s = _summary()
    claims = {c: {"answer": "no", "rule": f"the rule of {c}", "evidence": f"evidence {c}"}
              for c in ("gain_carried", "same_circuit", "function_kept")}
    s["verdicts"] = {m: claims for m in ("m1", "m2", "m3")}
    html = build_study_page(s, tmp_path).render()
    assert html.count("class='verdict no'") == 9
    from circuitdiff.methods.verdicts import VerdictRules
    from circuitdiff.report.html import esc

    for c in claims:  # not under every verdict: the rules table says it
        assert html.count(f"the rule of {c}") == 0, c
    for row in VerdictRules().table():  # the rules table (VerdictRules.table()), once
        assert html.count(f"<td>{esc(row['statistic'])}</td>") == 1, row["claim"]
