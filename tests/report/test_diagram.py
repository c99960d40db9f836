"""The circuit-flow figure draws one box per (group, token), one arrow per drawable edge, lists
empty groups, and places groups at the roles the task computes for an example prompt."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from circuitdiff.core.circuit import Circuit, CircuitEdge, CircuitGroup
from circuitdiff.core.task import EntityTrackingTask, TaskConfig, TaskError
from circuitdiff.report.diagram import circuit_flow_figure, example_layout

#: an unreadable figure (overlapping or clipped text) is an error in these tests
pytestmark = pytest.mark.filterwarnings(
    "error::circuitdiff.report.layout.FigureLayoutWarning")

#: a 12-token toy prompt: two boxes, labels at 3 and 8, separators at 4 and 9, last = 11
TOKENS = ["<s>", "The", " cup", " Box", " A", ",", " the", " pen", " Box", " B", ".", " the"]
ROLES = {"last": [11], "labels": [4, 9], "separators": [5, 10], "query_label": [9],
         "prev_query_label": [9]}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _lookback() -> Circuit:
    groups = {
        "value_reader": CircuitGroup([(2, 0), (3, 1), (3, 2)], "last", "value reader @ last"),
        "query_mover": CircuitGroup([(1, 3)], "last", "query-label mover @ last"),
        "label_keys": CircuitGroup([(0, 1)], "labels"),
        "object_mover": CircuitGroup([(0, 2), (1, 0)], "labels", "object mover @ labels"),
        "sep_mover": CircuitGroup([(1, 1)], "separators", "label mover @ separators"),
    }
    edges = [CircuitEdge("value_reader", "logits", "logits"),
             CircuitEdge("query_mover", "value_reader", "q"),
             CircuitEdge("label_keys", "value_reader", "k"),
             CircuitEdge("object_mover", "value_reader", "v"),
             CircuitEdge("sep_mover", "value_reader", "k")]
    return Circuit(groups, n_layers=4, n_heads=4, model="toy", edges=edges)


def _paper_chain() -> Circuit:
    groups = {
        "value_fetcher": CircuitGroup([(3, 0), (3, 1)], "last"),
        "position_transmitter": CircuitGroup([(2, 2)], "last"),
        "position_detector": CircuitGroup([(1, 0), (0, 3)], "query_label"),
        "structure_reader": CircuitGroup([], "prev_query_label+1"),
    }
    edges = [CircuitEdge("value_fetcher", "logits", "logits"),
             CircuitEdge("position_transmitter", "value_fetcher", "q"),
             CircuitEdge("position_detector", "position_transmitter", "v"),
             CircuitEdge("structure_reader", "position_detector", "v")]
    return Circuit(groups, n_layers=4, n_heads=4, edges=edges)


def test_lookback_circuit_figure(tmp_path):
    c = _lookback()
    path, lay = circuit_flow_figure(c, TOKENS, ROLES, tmp_path / "flow.png", title="lookback",
                                    n_prompts=64, return_layout=True)
    assert path == tmp_path / "flow.png" and path.exists()
    w, h = _png_size(path)
    assert 800 <= w <= 2700 and 400 <= h <= 1700
    # one box per non-empty group per covered token, at the group's layer span
    expected = {("value_reader", 11), ("query_mover", 11), ("label_keys", 4), ("label_keys", 9),
                ("object_mover", 4), ("object_mover", 9), ("sep_mover", 5), ("sep_mover", 10)}
    assert {(b.group, b.token) for b in lay.boxes} == expected
    assert len(lay.boxes) == len(expected)
    vr = lay.boxes_of("value_reader")[0]
    assert vr.y0 < 2 < 3 < vr.y1 and vr.y0 > 1 and vr.y1 < 4
    assert all(b.token - 0.5 <= b.x0 < b.x1 <= b.token + 0.5 for b in lay.boxes)
    # two groups sharing a token do not overlap
    a, b = sorted(lay.boxes_of("value_reader") + lay.boxes_of("query_mover"), key=lambda r: r.x0)
    assert a.x1 <= b.x0 + 1e-9
    # one arrow per edge; multi-position senders are bracketed over all their tokens
    assert [a.edge for a in lay.arrows] == c.edges
    by_sender = {a.edge.sender: a for a in lay.arrows}
    assert by_sender["label_keys"].bracket == (4, 9)
    assert by_sender["sep_mover"].bracket == (5, 10)
    assert by_sender["query_mover"].bracket == ()
    logits = by_sender["value_reader"]
    assert logits.end[1] > c.n_layers - 1 and logits.end[0] == pytest.approx(11)
    # integer layer ticks inside the layer range; title with n
    assert lay.yticks and all(t == int(t) and 0 <= t <= 3 for t in lay.yticks)
    assert "lookback" in lay.title and "n = 64 prompts" in lay.title
    assert lay.empty_groups == [] and "empty" not in lay.title


def test_paper_chain_with_empty_group(tmp_path):
    c = _paper_chain()
    out = circuit_flow_figure(c, TOKENS, ROLES, tmp_path / "sub" / "paper.png")
    assert out.exists() and _png_size(out)[0] >= 800
    _, lay = circuit_flow_figure(c, TOKENS, ROLES, tmp_path / "paper2.png", title="paper",
                                 return_layout=True)
    # the empty group (whose role has an offset) is not drawn but named under the title
    assert lay.empty_groups == ["structure_reader"]
    assert "empty: structure_reader @ prev_query_label+1" in lay.title
    assert "prompts" not in lay.title  # no n given
    assert {(b.group, b.token) for b in lay.boxes} == {
        ("value_fetcher", 11), ("position_transmitter", 11), ("position_detector", 9)}
    det = lay.boxes_of("position_detector")[0]
    assert det.y0 < 0 and 1 < det.y1 < 2  # heads at layers 0 and 1
    # the edge from the empty group is not drawn, and is reported
    drawn = [a.edge for a in lay.arrows]
    assert drawn == c.edges[:3]
    assert lay.skipped_edges == [c.edges[3]]
    assert "edges not drawn: structure_reader --v--> position_detector" in lay.title


def test_group_absent_from_prompt_is_listed(tmp_path):
    c = Circuit({"reader": CircuitGroup([(1, 0)], "last"),
                 "prev": CircuitGroup([(0, 0)], "prev_query_label")}, n_layers=2, n_heads=1,
                edges=[CircuitEdge("prev", "reader", "v")])
    roles = {**ROLES, "prev_query_label": [-1]}  # the query names no box in this prompt
    _, lay = circuit_flow_figure(c, TOKENS, roles, tmp_path / "a.png", return_layout=True)
    assert lay.absent_groups == ["prev"] and "not in this prompt: prev" in lay.title
    assert [b.group for b in lay.boxes] == ["reader"] and lay.arrows == []
    assert lay.skipped_edges == c.edges


def test_offset_roles_and_bad_roles(tmp_path):
    c = Circuit({"g": CircuitGroup([(0, 0)], "labels+1")}, n_layers=2, n_heads=1)
    _, lay = circuit_flow_figure(c, TOKENS, ROLES, tmp_path / "o.png", return_layout=True)
    assert sorted(b.token for b in lay.boxes) == [5, 10]
    assert lay.arrows == [] and lay.yticks == [0.0, 1.0]
    bad = Circuit({"g": CircuitGroup([(0, 0)], "objects")}, n_layers=2, n_heads=1)
    with pytest.raises(TaskError, match="objects"):
        circuit_flow_figure(bad, TOKENS, ROLES, tmp_path / "b.png")
    out = Circuit({"g": CircuitGroup([(0, 0)], "last+1")}, n_layers=2, n_heads=1)
    with pytest.raises(TaskError, match="outside"):
        circuit_flow_figure(out, TOKENS, ROLES, tmp_path / "c.png")


def test_example_layout_organisms_tokenizer(tmp_path):
    from circuitdiff.organisms.data import build_tokenizer

    tok = build_tokenizer()
    prompt = EntityTrackingTask(tok, TaskConfig(n_boxes=7), seed=0).sample(1)[0]
    tokens, roles = example_layout(tok, prompt, roles=["prev_query_label+1"])
    ids = tok(prompt.text).input_ids
    assert len(tokens) == len(ids)
    assert roles["last"] == [len(tokens) - 1]
    assert len(roles["labels"]) == 7
    assert [tokens[i].strip() for i in roles["labels"]] == prompt.labels
    assert tokens[roles["query_label"][0]].strip() == prompt.query_label
    assert roles["prev_query_label+1"] == [roles["prev_query_label"][0] + 1]
    for t, i in zip(tokens, ids):  # every token string round-trips to its id
        assert tok.convert_tokens_to_ids(t) == i
    # and the layout drives the figure for a circuit read at those roles
    c = Circuit({"reader": CircuitGroup([(1, 0)], "last"),
                 "labels": CircuitGroup([(0, 1)], "labels")}, n_layers=2, n_heads=2,
                edges=[CircuitEdge("labels", "reader", "k")])
    _, lay = circuit_flow_figure(c, tokens, roles, tmp_path / "ex.png", return_layout=True)
    assert len(lay.boxes_of("labels")) == 7 and len(lay.arrows) == 1
