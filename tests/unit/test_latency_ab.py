"""The latency A/B of ``benchmarks/bench_recipes``: ratios paired round by round, interpreters rebuilt each round,
the order rotated (the interpreters are stand-ins: what is tested is the protocol, not LiteRT)."""
import statistics

import pytest

bench_latency = pytest.importorskip("benchmarks.bench_latency")
from benchmarks.bench_recipes import interleaved_latency  # noqa: E402


class FakeInterpreter:
    def __init__(self, model: bytes):
        self.model = model


def test_ratios_are_paired_per_round_with_fresh_interpreters(monkeypatch):
    built, timed = [], []
    # the machine's speed moves from round to round (1, 3, 2) and model a is twice as fast in round 1: the median of
    # the paired ratios (2, 1, 2) is 2, where a ratio of the medians would read 3 / 2
    slow = [1.0, 3.0, 2.0]
    state = {"round": -1, "seen": 0}
    base = {b"a": 2.0, b"b": 3.0, b"ref": 1.0}

    def ready(model, threads):
        built.append(model)
        if state["seen"] % 3 == 0:
            state["round"] += 1
        state["seen"] += 1
        return FakeInterpreter(model)

    def median_invoke(it, runs):
        timed.append(it.model)
        r = state["round"]
        return base[it.model] * slow[r] * (0.5 if it.model == b"a" and r == 1 else 1.0)

    monkeypatch.setattr(bench_latency, "ready_interpreter", ready)
    monkeypatch.setattr(bench_latency, "median_invoke", median_invoke)
    out = interleaved_latency({"a": b"a", "b": b"b"}, b"ref", threads=1, rounds=3, invokes=5)
    assert len(built) == 9  # every interpreter rebuilt in every round
    assert timed[:3] == [b"a", b"b", b"ref"] and timed[3:6] == [b"b", b"ref", b"a"]  # rotated
    assert out["b"]["ratio"] == pytest.approx(3.0)
    assert out["a"]["ratio"] == pytest.approx(2.0)
    assert out["a"]["seconds"] == pytest.approx(statistics.median([2.0, 3.0, 4.0]))
    assert set(out) == {"a", "b"}
