"""Configuration: the documented example parses, and mistakes name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmd.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_example_config_is_valid_and_complete():
    cfg = load_config(REPO / "config" / "example.toml")
    kinds = {p.kind for p in cfg.providers}
    assert kinds == {"ollama", "openai", "anthropic"}
    assert cfg.models.root and cfg.models.sub and cfg.models.embed
    assert all(p.api_key_env != p.name for p in cfg.providers)
    # Every key the Structs know is shown in the example (so it documents all of them).
    text = (REPO / "config" / "example.toml").read_text()
    # Every [section] of the Config (new sections are covered without editing this test).
    sections = [f for f in type(cfg).__struct_fields__ if f != "providers"]
    assert "improve" in sections
    for section in sections:
        assert f"[{section}]" in text, f"[{section}] has no section in example.toml"
        for field in type(getattr(cfg, section)).__struct_fields__:
            assert f"{field} =" in text, f"[{section}] {field} is not documented in example.toml"


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[limits]\ncell_timout_s = 3\n", "cell_timout_s"),
        ("[limits]\ncell_timeout_s = 'soon'\n", "limits.cell_timeout_s"),
        ("[pool]\nstrategy = 'fastest'\n", "pool.strategy"),
        ("[[providers]]\nname='a'\nkind='ollama'\nmodels=['m']\n", "base_url"),
        (
            "[[providers]]\nname='a'\nkind='ollama'\nbase_url='http://x'\nmodels=['m']\n"
            "[[providers]]\nname='a'\nkind='ollama'\nbase_url='http://y'\nmodels=['m']\n",
            "unique",
        ),
        ("[cache]\nsemantic_threshold = 1.5\n", "semantic_threshold"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_is_explained(tmp_path, toml, needle):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert needle in str(ei.value) and str(f) in str(ei.value)


def test_missing_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")
