"""In the report tests an unreadable figure is an error: every figure saved here (through
``save_figure``) must have no overlapping or clipped text."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/report/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings(
                "error::circuitdiff.report.layout.FigureLayoutWarning"))
