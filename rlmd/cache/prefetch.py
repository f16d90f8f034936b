"""Speculative prefetch: map the last batch's prompt template over the next chunks.

When a turn's code maps one template over part of a list of chunks
(``llm_query_batched([f"Summarise:\\n{c}" for c in chunks[:10]])``) the next turn very
often asks for ``chunks[10:20]``.  While the root model thinks, the pool is idle, so the
same template is sent over the following chunks at priority 10 (the pool runs them only
on free slots and preempts them for any real call); their answers land in the exact
cache, and the next turn's real calls are cache hits.

Inference (:func:`infer_next`), all checks exact, giving up whenever one fails:

1. **Template**: the prompts' longest common prefix and suffix; the varying middles must
   be at least ``MIN_CHUNK_CHARS`` long (shorter ones are ids or numbers, not chunks).
2. **Location**: each middle is searched in the context file (mmap, bytes), each after the
   previous one.  The bytes between two consecutive middles must be the same for every
   pair; they are split into (a tail of the suffix the chunks all share, a separator from
   ``SEPARATORS``, a head of the prefix the chunks all share): a prefix/suffix that ate
   common leading/trailing characters of the chunks is given back to them.
3. **Layout**: either every chunk has the same length in characters and consecutive
   chunks start the same number of characters apart (fixed-size chunks, overlapping or
   not: ``context[i:i+n]``), or every chunk has the same number of lines and the
   separator is ``"\\n"`` or empty (``"\\n".join(lines[i:i+k])`` or kept line ends).
4. **Next chunks**: the same layout continued after the last chunk, up to as many as the
   batch had (at most ``max_ahead``), stopping at the end of the text.

Accounting (:class:`SpeculationStats`): what was dispatched, completed, cancelled, the
tokens and cost of speculation (reported apart from the query's own), the hits (a real
call whose prompt had been prefetched) and the waste (completed but never used).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from rlmd.cache.exact import call_key
from rlmd.providers.base import ChatRequest, ChatResult, Message

log = logging.getLogger(__name__)

PRIORITY = 10
MIN_CHUNK_CHARS = 32
MAX_AHEAD = 16
SEPARATORS = ("", "\n", "\n\n", " ", "\r\n")
# Bounds on what model-written code can make inference do: the last prompts of a batch
# suffice to find the layout, and a longer gap between chunks is not a chunked list.
MAX_OBSERVE = 64
MAX_GAP = 256


class Layout(msgspec.Struct, frozen=True, kw_only=True):
    """How the seen chunks sit in the text, and where the next one starts."""

    kind: Literal["chars", "lines"]
    prefix: str  # the template around each chunk
    suffix: str
    size: int  # characters (kind "chars") or lines (kind "lines") per chunk
    stride: int  # characters from one chunk's start to the next ("chars")
    sep: str  # what lies between two chunks ("lines")
    next_byte: int  # byte offset in the file where the next chunk starts


class SpeculationStats(msgspec.Struct, kw_only=True):
    """Speculation of one query (or summed over queries): reported apart from real calls."""

    batches_seen: int = 0
    templates_found: int = 0
    dispatched: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    hits: int = 0
    wasted: int = 0  # completed but never asked for by the query
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    wasted_tokens_in: int = 0
    wasted_tokens_out: int = 0
    wasted_cost: float = 0.0


# --------------------------------------------------------------------------- inference


def _common_prefix(items: list[str]) -> str:
    # Character-wise on purpose: prompts are not paths.
    return os.path.commonprefix(items)  # noqa: RUF071


def _common_suffix(items: list[str]) -> str:
    return _common_prefix([s[::-1] for s in items])[::-1]


def _template(prompts: list[str]) -> tuple[str, str, list[str]] | None:
    if len(prompts) < 2 or len(set(prompts)) != len(prompts):
        return None
    prefix = _common_prefix(prompts)
    shortest = min(len(p) for p in prompts)
    suffix = _common_suffix(prompts)
    room = shortest - len(prefix)  # prefix and suffix must not overlap in any prompt
    if len(suffix) > room:
        suffix = suffix[len(suffix) - room :]
    middles = [p[len(prefix) : len(p) - len(suffix)] for p in prompts]
    if min(len(m) for m in middles) < MIN_CHUNK_CHARS:
        return None
    return prefix, suffix, middles


def _split_gap(gap: str, prefix: str, suffix: str) -> tuple[int, str, int] | None:
    """(chars of suffix given back, separator, chars of prefix given back), fewest first."""
    if len(gap) > MAX_GAP:
        return None
    best: tuple[int, str, int] | None = None
    for ks in range(0, min(len(gap), len(suffix)) + 1):
        if gap[:ks] != suffix[:ks]:
            break
        for kp in range(0, min(len(gap) - ks, len(prefix)) + 1):
            if kp and gap[len(gap) - kp :] != prefix[len(prefix) - kp :]:
                break
            sep = gap[ks : len(gap) - kp]
            if sep in SEPARATORS and (best is None or ks + kp < best[0] + best[2]):
                best = (ks, sep, kp)
    return best


def infer_layout(prompts: list[str], mm: mmap.mmap | bytes) -> Layout | None:
    """The chunk layout the prompts were made from, or None (see the module docstring)."""
    t = _template(prompts)
    if t is None:
        return None
    prefix, suffix, middles = t
    starts: list[int] = []
    pos = 0
    for m in middles:
        b = mm.find(m.encode("utf-8"), pos)
        if b < 0:
            return None
        starts.append(b)
        pos = b + 1
    ends = [b + len(m.encode("utf-8")) for b, m in zip(starts, middles, strict=True)]
    gaps = set()
    for e, b in zip(ends, starts[1:], strict=False):
        if b < e:
            gaps.add(None)  # overlapping chunks: handled by the fixed-size rule below
        elif b - e > MAX_GAP * 4:
            return None  # chunks far apart (a sample, not a walk through the list)
        else:
            gaps.add(bytes(mm[e:b]))
    if len(gaps) != 1:
        return None
    (gap_b,) = gaps
    ks, kp, sep = 0, 0, ""
    if gap_b is not None:
        try:
            gap = gap_b.decode("utf-8")
        except UnicodeDecodeError:
            return None
        split = _split_gap(gap, prefix, suffix)
        if split is None:
            return None
        ks, sep, kp = split
    # Give the shared chunk edges back to the chunks; check the first and last chunk too.
    pre_b = prefix[len(prefix) - kp :].encode("utf-8")
    suf_b = suffix[:ks].encode("utf-8")
    starts = [b - len(pre_b) for b in starts]
    ends = [e + len(suf_b) for e in ends]
    if starts[0] < 0 or bytes(mm[starts[0] : starts[0] + len(pre_b)]) != pre_b:
        return None
    if bytes(mm[ends[-1] - len(suf_b) : ends[-1]]) != suf_b:
        return None
    prefix, suffix = prefix[: len(prefix) - kp], suffix[ks:]
    chunks = [bytes(mm[b:e]).decode("utf-8", "replace") for b, e in zip(starts, ends, strict=True)]
    lengths = {len(c) for c in chunks}
    strides = {
        len(bytes(mm[a:b]).decode("utf-8", "replace")) for a, b in itertools.pairwise(starts)
    }
    if len(lengths) == 1 and len(strides) == 1:
        (size,) = lengths
        (stride,) = strides
        # The next start is ``stride`` characters after the last start.
        nxt = _advance_chars(mm, starts[-1], stride)
        return Layout(
            kind="chars",
            prefix=prefix,
            suffix=suffix,
            size=size,
            stride=stride,
            sep=sep,
            next_byte=nxt,
        )
    if gap_b is not None and sep in ("\n", ""):
        counts = {c.count("\n") + (1 if sep == "\n" else 0) for c in chunks}
        if sep == "" and not all(c.endswith("\n") for c in chunks):
            return None
        if len(counts) == 1:
            return Layout(
                kind="lines",
                prefix=prefix,
                suffix=suffix,
                size=counts.pop(),
                stride=0,
                sep=sep,
                next_byte=ends[-1] + len(sep.encode()),
            )
    return None


def _advance_chars(mm: mmap.mmap | bytes, start: int, chars: int) -> int:
    """The byte offset ``chars`` characters after byte ``start`` (UTF-8)."""
    window = bytes(mm[start : start + chars * 4])
    text = window.decode("utf-8", "ignore")[:chars]
    return start + len(text.encode("utf-8"))


def next_chunks(layout: Layout, mm: mmap.mmap | bytes, count: int) -> list[str]:
    """Up to ``count`` chunks following the seen ones (fewer at the end of the text)."""
    out: list[str] = []
    pos = layout.next_byte
    total = len(mm)
    for _ in range(count):
        if pos >= total:
            break
        if layout.kind == "chars":
            window = bytes(mm[pos : pos + layout.size * 4])
            chunk = window.decode("utf-8", "ignore")[: layout.size]
            pos = _advance_chars(mm, pos, layout.stride)
        else:
            end = pos
            for _line in range(layout.size):
                nl = mm.find(b"\n", end)
                if nl < 0:
                    end = total
                    break
                end = nl + 1
            # "\n".join(lines) drops the last line's end; kept line ends keep it.
            body_end = (
                end - 1 if layout.sep == "\n" and end > pos and mm[end - 1 : end] == b"\n" else end
            )
            chunk = bytes(mm[pos:body_end]).decode("utf-8", "replace")
            pos = end
        if not chunk:
            break
        out.append(chunk)
    return out


def infer_next(prompts: list[str], text_path: Path, count: int) -> list[str]:
    """The prompts that would map the batch's template over the next ``count`` chunks."""
    if count <= 0:
        return []
    try:
        with open(text_path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                layout = infer_layout(prompts[-MAX_OBSERVE:], mm)
                if layout is None:
                    return []
                chunks = next_chunks(layout, mm, count)
    except OSError as exc:
        log.debug("prefetch: cannot read %s: %r", text_path, exc)
        return []
    seen = set(prompts)
    made = [layout.prefix + c + layout.suffix for c in chunks]
    return [p for p in made if p not in seen]


# --------------------------------------------------------------------------- running


class _Pool(Protocol):
    async def chat(
        self, req: ChatRequest, *, on_delta: Any = None, priority: int = 0, affinity: Any = None
    ) -> ChatResult: ...


class _Cache(Protocol):
    async def contains(self, req: ChatRequest) -> bool: ...


def sub_request(prompt: str, model: str) -> ChatRequest:
    """The request the engine makes for a sub-call (must match it for cache hits)."""
    return ChatRequest(model=model, messages=(Message("user", prompt),))


class _Spec:
    __slots__ = ("claimed", "result", "task")

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.result: ChatResult | None = None
        self.claimed = False


class Prefetcher:
    """Speculation for one query.  Use ``async with Prefetcher(...) as pf``.

    The engine calls :meth:`observe_batch` after an ``llm_query_batched`` (or a run of
    ``llm_query`` over chunks) and :meth:`claim` before each real sub-call.  Leaving the
    ``async with`` cancels what is still running and counts the waste.
    """

    def __init__(
        self,
        pool: _Pool,
        cache: _Cache | None,
        *,
        text_path: Path | None,
        enabled: bool = True,
        max_ahead: int = MAX_AHEAD,
        make_request: Callable[[str, str], ChatRequest] = sub_request,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._text_path = text_path
        self.enabled = enabled and cache is not None and text_path is not None
        self._max_ahead = max_ahead
        self._make = make_request
        self._on_event = on_event
        self._specs: dict[bytes, _Spec] = {}
        self.stats = SpeculationStats()
        self._closed = False

    async def __aenter__(self) -> Prefetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def observe_batch(self, prompts: list[str], model: str) -> int:
        """Prefetch the batch's template over the next chunks; returns how many started."""
        if not self.enabled or self._closed:
            return 0
        self.stats.batches_seen += 1
        assert self._text_path is not None
        count = min(len(prompts), self._max_ahead)
        upcoming = await asyncio.to_thread(infer_next, prompts, self._text_path, count)
        if not upcoming:
            return 0
        self.stats.templates_found += 1
        started = 0
        for prompt in upcoming:
            req = self._make(prompt, model)
            key = call_key(req)
            if key in self._specs:
                continue
            assert self._cache is not None
            if await self._cache.contains(req):
                continue  # already answered once: the real call will hit anyway
            task = asyncio.create_task(self._run(key, req), name="rlmd-prefetch")
            self._specs[key] = _Spec(task)
            started += 1
        self.stats.dispatched += started
        if started and self._on_event is not None:
            self._on_event({"kind": "speculation", "status": "start", "calls": started})
        return started

    def claim(self, req: ChatRequest) -> None:
        """A real call for ``req`` is about to run: count a hit, or cancel the duplicate.

        A speculative call still queued or running is cancelled (the real call runs at
        its own priority now; waiting for a preemptible call could only delay it).
        """
        spec = self._specs.get(call_key(req))
        if spec is None or spec.claimed:
            return
        spec.claimed = True
        if spec.result is not None:
            self.stats.hits += 1
        elif not spec.task.done():
            spec.task.cancel()
            self.stats.cancelled += 1

    async def _run(self, key: bytes, req: ChatRequest) -> None:
        spec = self._specs[key]
        try:
            result = await self._pool.chat(req, priority=PRIORITY)
        except Exception as exc:  # speculation failing costs nothing but the attempt
            self.stats.failed += 1
            log.debug("speculative call failed: %r", exc)
            return
        if result.cached:
            return
        spec.result = result
        self.stats.completed += 1
        self.stats.tokens_in += result.usage.input
        self.stats.tokens_out += result.usage.output
        self.stats.cost += result.cost

    async def aclose(self) -> None:
        """Cancel speculation still running; count completed results never used as waste."""
        if self._closed:
            return
        self._closed = True
        running = [s.task for s in self._specs.values() if not s.task.done()]
        for t in running:
            t.cancel()
        self.stats.cancelled += len(running)
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        for s in self._specs.values():
            if s.result is not None and not s.claimed:
                self.stats.wasted += 1
                self.stats.wasted_tokens_in += s.result.usage.input
                self.stats.wasted_tokens_out += s.result.usage.output
                self.stats.wasted_cost += s.result.cost
        if self._on_event is not None and self.stats.dispatched:
            self._on_event(
                {"kind": "speculation", "status": "end", **msgspec.to_builtins(self.stats)}
            )
