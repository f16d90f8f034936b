"""context/search over the socket: mode "ranked" with locations; regex hits of a directory
context carry file and file_line; the CLI's --ranked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlmd.client import RpcError
from rlmd.protocol.errors import BAD_INPUT

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("import os\n\nRATE = 3\n")
    (root / "config.toml").write_text("[tariff]\nname = 'night'\nprice_per_kwh = 0.45\n")
    (root / "README.md").write_text("# Project\nSee config.toml for the tariff.\n")


def test_ranked_and_regex_search_carry_locations(daemon, tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    daemon.call("context/put", {"name": "d", "path": str(tmp_path / "t")})
    text = daemon.call("context/peek", {"name": "d", "start": 0, "end": 10**6})["text"]
    r = daemon.call(
        "context/search", {"name": "d", "mode": "ranked", "query": "price per kwh?", "k": 3}
    )
    top = r["matches"][0]
    assert (top["file"], top["file_line"], top["text"]) == (
        "config.toml",
        3,
        "price_per_kwh = 0.45",
    )
    assert text[top["start"] : top["end"]] == top["text"]
    assert top["line"] == text[: top["start"]].count("\n") + 1 and top["score"] > 0
    m = daemon.call("context/search", {"name": "d", "pattern": r"RATE"})["matches"]
    assert (m[0]["file"], m[0]["file_line"], m[0]["text"]) == ("src/app.py", 3, "RATE")
    daemon.call("context/put", {"name": "t", "text": "one\ntwo RATE\n"})
    m = daemon.call("context/search", {"name": "t", "pattern": r"RATE"})["matches"]
    assert m == [{"start": 8, "end": 12, "line": 2, "text": "RATE", "truncated": False,
                  "file": None, "file_line": None}]  # fmt: skip
    for bad in [{"mode": "ranked"}, {"mode": "ranked", "query": "x", "pattern": "x"}, {}]:
        with pytest.raises(RpcError) as ei:
            daemon.call("context/search", {"name": "t", **bad})
        assert ei.value.code == BAD_INPUT and "ranked" in ei.value.message
    out = subprocess.run(
        [sys.executable, "-m", "rlmd.cli.main", "--socket", str(daemon.socket), "context", "search",
         "d", "--ranked", "tariff price", "-k", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("config.toml:")
