"""bench.architectures on the tiny bundles of every served kind: a row per bundle and session count, CPU figures
that add up (beyond the model = served less F1)."""

from __future__ import annotations

import json

from bench import architectures


def test_every_bundle_gets_f1_and_w2_rows_with_the_cost_beyond_the_model(bundles, tmp_path, monkeypatch):
    monkeypatch.setattr(architectures, "SESSIONS", (1, 4))
    monkeypatch.setattr(architectures, "F1_CALLS", {1: 50, 4: 50})
    monkeypatch.setattr(architectures, "W2_STEPS", {1: 100, 4: 50})  # past the 10 ms tick of /proc CPU times
    kinds = ("lstm", "bpe", "ssm")
    out = tmp_path / "architectures.json"
    architectures.main([str(bundles[kind].path) for kind in kinds] + ["--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(row["model"], row["sessions"]) for row in rows] == [(f"tiny-{kind}", n) for kind in kinds for n in (1, 4)]
    for row in rows:
        assert row["f1_cpu_us_per_token"] >= 0 and row["w2_server_cpu_us_per_token"] > 0 and row["w2_tokens_per_s"] > 0
        assert abs(row["beyond_model_cpu_us_per_token"]
                   - (row["w2_server_cpu_us_per_token"] - row["f1_cpu_us_per_token"])) <= 0.11
    assert {row["vocabulary"] for row in rows} == {"characters", "tokenizer"}
    assert "ssm [1, 2, 4, 3] float32" in {row["states"] for row in rows}
