"""bench/position_encodings.py at a tiny size: every encoding trains, is scored at L, 2L and 4L, and the outputs are
written. The losses themselves are what the benchmark is for; here they only have to be finite and distinct."""

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "position_encodings.py"


def _bench():
    spec = importlib.util.spec_from_file_location("position_encodings", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_encoding_is_scored_at_every_length(tmp_path, capsys):
    bench = _bench()
    summary = bench.compare(
        steps=3, length=16, out=tmp_path, hidden=64, depth=1, batch_size=4, vocab=300, log=lambda m: None
    )
    assert summary["eval_lengths"] == [16, 32, 64]
    results = summary["encodings"]
    assert list(results) == ["rope", "sinusoidal", "learned", "alibi"]
    for encoding, r in results.items():
        for k in ("1L", "2L", "4L"):
            assert math.isfinite(r[k]["loss"]), (encoding, k)
            assert r[k]["tokens"] > 0
        assert r["1L"]["loss_past_L"] is None  # nothing lies past L in a window of L
        assert math.isfinite(r["2L"]["loss_past_L"]) and math.isfinite(r["4L"]["loss_past_L"])
        assert r["untrained_past_L"] == (encoding == "learned")
    # Each encoding is its own model: the same seed, data and steps give four different held-out losses.
    assert len({round(r["1L"]["loss"], 6) for r in results.values()}) == 4

    saved = json.loads((tmp_path / "position_encodings.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (tmp_path / "position_encodings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bench.print_table(summary)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["learned"].endswith("*") and not rows["rope"].endswith("*")
    assert "never trained" in rows["*"]
