"""docs/benchmarks.md is written by the runner: sections are replaced, others kept."""

from __future__ import annotations

import pytest

from rlmd.bench.doc import update_doc


def test_sections_are_replaced_and_others_kept(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nIntro written by hand.\n")
    plot = tmp_path / "sniah.png"
    plot.write_bytes(b"\x89PNG fake")
    update_doc(
        doc, "quality", "# rlm bench results\n\n## sniah\n\n| a |\n", "rlm bench --n 1", [plot]
    )
    update_doc(doc, "perf", "# perf\n\nfast\n", "rlm bench --suite perf")
    update_doc(doc, "quality", "# rlm bench results\n\n## sniah\n\nsecond run\n", "rlm bench --n 2")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nIntro written by hand.")
    assert text.count("<!-- rlm-bench:quality:start -->") == 1
    assert "second run" in text and "| a |" not in text
    assert "fast" in text and "rlm bench --suite perf" in text
    assert "rlm bench --n 2" in text and "- machine: " in text and "- date: " in text
    assert "#### sniah" in text  # report headings demoted under the section
    assert (doc.parent / "img" / "quality-sniah.png").read_bytes() == b"\x89PNG fake"


def test_bad_section_name_refused(tmp_path):
    with pytest.raises(ValueError, match="simple name"):
        update_doc(tmp_path / "d.md", "a b", "x", "cmd")
