"""The trace writer works off the caller's thread (issue 14, Broken 5: encoding and
redaction on the event loop froze daemon/ping for 7.2 s), and keeps long texts by
reference."""

from __future__ import annotations

import threading

from rlmd.engine.trace import TraceWriter, clip_for_trace, read_trace, trace_path


def test_records_are_encoded_and_redacted_off_the_callers_thread(tmp_path, monkeypatch):
    seen: list[str] = []
    w = TraceWriter(trace_path(tmp_path, "j"), secrets=["sk-SECRET-123"])
    real = w._redact

    def spy(data: bytes) -> bytes:
        seen.append(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr(w, "_redact", spy)
    w.write("a", text="the key sk-SECRET-123 leaked")
    w.write("b", bad=object())  # unencodable: must not raise in the caller
    w.close()
    recs = read_trace(tmp_path, "j")
    assert [r["type"] for r in recs] == ["a", "unencodable"]
    assert "[redacted]" in recs[0]["text"] and "SECRET" not in recs[0]["text"]
    assert seen and all(name == "rlmd-trace" for name in seen)
    assert threading.current_thread().name not in seen


def test_a_long_text_is_kept_by_reference():
    assert clip_for_trace("short") == "short"
    ref = clip_for_trace("x" * 100_000)
    assert isinstance(ref, dict) and ref["chars"] == 100_000
    assert len(ref["head"]) + len(ref["tail"]) == 8_000 and len(ref["sha256"]) == 64
