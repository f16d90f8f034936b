"""The semantic tier: a new question close enough to an earlier one gets its answer.

Only whole-query answers live here, and each is keyed by the *context version* (the
store's content hash, ``ContextStore.version(name)``), the root model and the embedding
model: an answer is never returned for a different text, model or vector space.
Sub-call prompts carry context chunks and stay exact-cache only.

A lookup embeds the question, takes the cosine with every earlier question of the same
key (one matrix-vector product over a normalised float32 matrix kept in memory, loaded
lazily from SQLite), and accepts the best candidates above the threshold only when the
*guard* agrees: the numbers, paths, file names, quoted strings, identifiers, proper names,
negations and contrast words ("before"/"after", "largest"/"smallest") of the two questions
must be equal as sets.  Near-misses such as "TODO items in src/" vs "in tests/" are close
in any embedding; the guard is what refuses them (measured in bench/bench_cache.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import msgspec
import numpy as np

from rlmd.cache.exact import CacheDB

log = logging.getLogger(__name__)

EmbedFn = Callable[[list[str]], Awaitable[list[list[float]]]]

# Measured on bench/data/paraphrases.jsonl (see docs/cache.md).
DEFAULT_THRESHOLD = 0.75
# Candidates above the threshold checked against the guard, best first.
MAX_CANDIDATES = 8
# Longer "questions" (a document pasted into the query) are not paraphrase-matched: two
# long texts that differ in one sentence embed almost alike, and embedding a megabyte
# would hold a thread (the lexical embedder: the event loop) for seconds.  The exact
# tier still serves their repeated calls.
MAX_QUESTION_CHARS = 4000
# Default bound of the in-memory index ([cache] semantic_index_bytes).
DEFAULT_INDEX_BYTES = 32 * 1024 * 1024
# Bytes counted per group and per question besides the vectors and the text (the Python
# objects holding them), so that many empty or tiny groups are bounded too.
GROUP_OVERHEAD = 512
ROW_OVERHEAD = 120


class SemanticAnswer(msgspec.Struct, kw_only=True):
    """What is stored for a question: the answer and what it cost to compute."""

    answer: str
    job: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    elapsed_s: float = 0.0


class Hit(msgspec.Struct, kw_only=True):
    """A semantic hit: the earlier question, its similarity and its answer."""

    question: str
    similarity: float
    answer: SemanticAnswer


# ------------------------------------------------------------------------- the guard

_QUOTED = re.compile(r"\"([^\"]*)\"|'([^']{1,200})'|`([^`]*)`|“([^”]*)”")
_PATH = re.compile(r"(?:[\w.~-]*[/\\][\w./\\~-]*)|(?:\b[\w-]+\.[A-Za-z][A-Za-z0-9]{0,5}\b)")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_WORDS = re.compile(r"[A-Za-z_][A-Za-z0-9_']*")
_NEGATIONS = frozenset(
    "not no never without except excluding exclude none nor neither non cannot "
    "don't doesn't didn't isn't aren't wasn't weren't won't can't unless".split()
)
# Words whose swap turns a question into a different one.
_CONTRAST = frozenset(
    """before after above below over under more less fewer greater larger smaller largest
    smallest biggest highest lowest longest shortest first last earliest latest oldest
    newest min max minimum maximum increase increased decrease decreased top bottom
    ascending descending most least best worst open opened closed close failed passed
    success successful failure failures succeeded added removed deleted created
    read write reads writes fail pass enabled disabled true false start end begin""".split()
)
_NUMBER_WORDS = frozenset(
    """zero one two three four five six seven eight nine ten eleven twelve twenty
    hundred thousand million billion first second third fourth fifth""".split()
)


def _contrast_stem(word: str) -> str:
    # "reads"/"read", "failed"/"fail", "opened"/"open": one polarity, one key.
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and len(word) > len(suffix) + 3:
            return word[: -len(suffix)]
    return word


class Features(msgspec.Struct, frozen=True):
    """What must be equal between two questions for one's answer to serve the other."""

    numbers: frozenset[str]
    paths: frozenset[str]
    quoted: frozenset[str]
    identifiers: frozenset[str]
    names: frozenset[str]
    negations: int
    contrast: frozenset[str]


def features(question: str) -> Features:
    """The guard's view of a question."""
    quoted = frozenset(
        next(g for g in m.groups() if g is not None) for m in _QUOTED.finditer(question)
    )
    rest = _QUOTED.sub(" ", question)
    paths = frozenset(p.strip("./\\").lower() or p for p in _PATH.findall(rest) if p.strip())
    rest_np = _PATH.sub(" ", rest)
    numbers = {n.replace(",", "") for n in _NUMBER.findall(rest_np)}
    idents: set[str] = set()
    names: set[str] = set()
    negations = 0
    contrast: set[str] = set()
    words = _WORDS.findall(rest_np)
    for i, w in enumerate(words):
        lw = w.lower()
        if lw in _NEGATIONS or lw.endswith("n't"):
            negations += 1
            continue
        if lw in _CONTRAST:
            contrast.add(_contrast_stem(lw))
        if lw in _NUMBER_WORDS:
            numbers.add(lw)
        if "_" in w or re.search(r"[a-z][A-Z]", w) or re.search(r"[A-Za-z]\d", w):
            idents.add(w)
        elif len(w) > 1 and w.isupper():
            idents.add(w.removesuffix("'s"))  # CONSTANTS, acronyms (HTTP, ERROR)
        elif i > 0 and w[0].isupper() and w.lower() not in _NEGATIONS:
            names.add(lw.removesuffix("'s"))  # a capitalised word inside a sentence: a name
    return Features(
        numbers=frozenset(numbers),
        paths=paths,
        quoted=quoted,
        identifiers=frozenset(i.lower() for i in idents),
        names=frozenset(names),
        negations=negations,
        contrast=frozenset(contrast),
    )


def _plain_words(text: str) -> set[str]:
    return {w.lower().removesuffix("'s") for w in _WORDS.findall(text)}


def guard_allows(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` agree on every specific the guard checks.

    Numbers, paths, quoted strings, negations and contrast words must be equal.  An
    identifier or name in one question only must not occur in the other at all, not even
    as a plain word ("TODO items" and "todo items" agree; "Alice" and "Bob" do not).
    """
    fa, fb = features(a), features(b)
    if (fa.numbers, fa.paths, fa.quoted, fa.negations, fa.contrast) != (
        fb.numbers,
        fb.paths,
        fb.quoted,
        fb.negations,
        fb.contrast,
    ):
        return False
    words_a, words_b = _plain_words(a), _plain_words(b)
    for mine, theirs, other_words in (
        (fa.identifiers | fa.names, fb.identifiers | fb.names, words_b),
        (fb.identifiers | fb.names, fa.identifiers | fa.names, words_a),
    ):
        if any(w not in theirs and w not in other_words for w in mine):
            return False
    return True


# ------------------------------------------------------------------------- the index


class _Group:
    """The questions of one (context version, model, embedding model), as a matrix.

    The matrix grows by doubling from one row: a version asked about once costs one vector
    (2-3.5 KB), not a preallocated block (16 rows, 32-57 KB per version, as it used to).
    """

    def __init__(self, dims: int) -> None:
        self.ids: list[int] = []
        self.questions: list[str] = []
        self.matrix = np.zeros((0, dims), dtype=np.float32)
        self.text_bytes = 0

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """What this group holds in memory, roughly (vectors, questions, objects)."""
        return self.matrix.nbytes + self.text_bytes + GROUP_OVERHEAD + ROW_OVERHEAD * self.n

    def add(self, row_id: int, question: str, vec: np.ndarray) -> None:
        if self.n == self.matrix.shape[0]:
            grown = np.zeros((max(1, self.n * 2), self.matrix.shape[1]), dtype=np.float32)
            grown[: self.n] = self.matrix[: self.n]
            self.matrix = grown
        self.matrix[self.n] = vec
        self.ids.append(row_id)
        self.questions.append(question)
        self.text_bytes += len(question)


def _unit(vec: list[float]) -> np.ndarray:
    v = np.asarray(vec, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


class SemanticCache:
    """Whole-query answers found by question similarity on the same context version.

    ``embed`` embeds a list of texts (``lambda t: pool.embed(t, model)`` or the built-in
    :class:`rlmd.cache.embedder.LexicalEmbedder`); ``embed_model`` names its vector
    space (part of the key).  ``guard=False`` turns the guard off (for measuring only).
    """

    def __init__(
        self,
        db: CacheDB,
        embed: EmbedFn,
        *,
        embed_model: str,
        threshold: float = DEFAULT_THRESHOLD,
        guard: bool = True,
        index_bytes: int = DEFAULT_INDEX_BYTES,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"semantic_threshold must be in (0, 1], got {threshold}")
        self.db = db
        self._embed = embed
        self.embed_model = embed_model
        self.threshold = threshold
        self.guard = guard
        # Touched only on the cache thread.  Least recently used first; bounded by
        # ``index_bytes`` (an evicted group reloads from SQLite on its next use).
        self.index_bytes = index_bytes
        self._groups: OrderedDict[tuple[str, str], _Group] = OrderedDict()

    async def lookup(self, question: str, context_version: str, model: str) -> Hit | None:
        """The answer of an earlier, equivalent question on this exact text, or None."""
        if not context_version or len(question) > MAX_QUESTION_CHARS:
            return None  # no text or an unknown version (nothing is safe to reuse), or too long
        try:
            vec = _unit((await self._embed([question]))[0])
        except Exception as exc:  # an unreachable embedding model only costs the hit
            log.warning("semantic cache: embedding the question failed: %r", exc)
            return None
        return await self.db.run(self._lookup_sync, question, context_version, model, vec)

    async def store(
        self, question: str, context_version: str, model: str, result: SemanticAnswer
    ) -> None:
        """Remember ``result`` as the answer to ``question`` on this context version."""
        if not context_version or not result.answer or len(question) > MAX_QUESTION_CHARS:
            return
        try:
            vec = _unit((await self._embed([question]))[0])
        except Exception as exc:
            log.warning("semantic cache: embedding the question failed: %r", exc)
            return
        await self.db.run(self._store_sync, question, context_version, model, vec, result)

    def lookup_vector_sync(
        self, question: str, context_version: str, model: str, vec: np.ndarray
    ) -> Hit | None:
        """:meth:`lookup` with a ready unit vector, on the calling thread (benchmarks)."""
        return self._lookup_sync(question, context_version, model, vec)

    # ------------------------------------------------------------------ cache thread

    def _group(self, context_version: str, model: str, dims: int) -> _Group:
        key = (context_version, model)
        g = self._groups.get(key)
        if g is not None:
            self._groups.move_to_end(key)
        else:
            g = _Group(dims)
            rows = self.db.conn().execute(
                "SELECT id, question, vector FROM semantic "
                "WHERE context_version = ? AND model = ? AND embed_model = ? ORDER BY id",
                (context_version, model, self.embed_model),
            )
            for row_id, q, blob in rows:
                v = np.frombuffer(blob, dtype=np.float32)
                if v.shape[0] == dims:
                    g.add(row_id, q, v)
            self._groups[key] = g
            self._bound()
        return g

    def index_nbytes(self) -> int:
        """Bytes the in-memory index holds now (cache thread)."""
        return sum(g.nbytes for g in self._groups.values())

    def _bound(self) -> None:
        """Drop least recently used groups until the index fits (the newest stays)."""
        total = self.index_nbytes()
        while total > self.index_bytes and len(self._groups) > 1:
            _key, g = self._groups.popitem(last=False)
            total -= g.nbytes

    def _lookup_sync(
        self, question: str, context_version: str, model: str, vec: np.ndarray
    ) -> Hit | None:
        g = self._group(context_version, model, vec.shape[0])
        if g.n == 0 or g.matrix.shape[1] != vec.shape[0]:
            self.db.count("semantic_misses")
            return None
        sims = g.matrix[: g.n] @ vec
        above = np.flatnonzero(sims >= self.threshold)
        if above.size == 0:
            self.db.count("semantic_misses")
            return None
        order = above[np.argsort(-sims[above])][:MAX_CANDIDATES]
        for i in order:
            if self.guard and not guard_allows(question, g.questions[i]):
                continue
            row = (
                self.db.conn()
                .execute("SELECT value FROM semantic WHERE id = ?", (g.ids[i],))
                .fetchone()
            )
            if row is None:
                continue  # evicted or cleared by another process meanwhile
            self.db.count("semantic_hits")
            return Hit(
                question=g.questions[i],
                similarity=round(float(sims[i]), 4),
                answer=msgspec.msgpack.decode(row[0], type=SemanticAnswer),
            )
        self.db.count("semantic_refused")
        return None

    def _store_sync(
        self,
        question: str,
        context_version: str,
        model: str,
        vec: np.ndarray,
        result: SemanticAnswer,
    ) -> None:
        value = msgspec.msgpack.encode(result)
        blob = vec.astype(np.float32).tobytes()
        size = len(value) + len(blob) + len(question) + 96
        g = self._group(context_version, model, vec.shape[0])
        with self.db.write() as c:
            cur = c.execute(
                "INSERT INTO semantic(context_version, model, embed_model, question, vector,"
                " value, size, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    context_version,
                    model,
                    self.embed_model,
                    question,
                    blob,
                    value,
                    size,
                    time.time(),
                ),
            )
            c.execute("UPDATE meta SET v = v + ? WHERE k = 'total_bytes'", (size,))
        if cur.lastrowid is not None:
            g.add(cur.lastrowid, question, vec)
            self._bound()

    def forget_sync(self) -> None:
        """Drop the in-memory index (after ``cache/clear``); it reloads from the file."""
        self._groups.clear()
