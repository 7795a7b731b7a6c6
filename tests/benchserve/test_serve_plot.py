"""scripts/bench_serve_all.py's bar chart of a run: legend names, which servers are drawn, a PNG written."""

from __future__ import annotations

from script_loader import load_script


def row(label: str, precision: str, concurrency: int, tps: float, rounds: list[float] | None = None) -> dict:
    r = {"label": label, "precision": precision, "concurrency": concurrency, "date": "2026-12-01",
         "summary": {"output_throughput_tps": tps}}
    return {**r, "rounds_tps": rounds} if rounds else r


def test_legend_names():
    script = load_script("bench_serve_all.py")
    assert script.short_name(script.HEXGEN_TWO, "fp32") == \
        "hexgen serve: two-stage pipeline TP 1 | TP 1, 15 + 15 layers"
    assert script.short_name(script.HEXGEN_ONE, "fp32") == "hexgen serve: one replica, one process"
    assert script.short_name(script.HEXGEN_ONE, "bf16") == "hexgen serve: one replica, one process [bf16]"
    assert script.short_name(script.VLLM, "fp32") == "vLLM 0.32.0 CPU [fp32]"
    assert script.short_name("**hexgen serve**", "fp32") == "hexgen serve"  # a row of --hexgen-url


def test_plot_draws_servers_measured_at_both_loads(tmp_path, monkeypatch):
    script = load_script("bench_serve_all.py")
    drawn = {}

    def fake_bars(path, groups, series, *, ylabel, title, spans=None):
        drawn.update(groups=groups, series=series, spans=spans)
        return path

    monkeypatch.setattr("hexgen.sim.plots.plot_bars", fake_bars)
    rows = [row(script.HEXGEN_ONE, "fp32", 1, 15.0, [15.0, 17.3, 14.8]),
            row(script.HEXGEN_ONE, "fp32", 16, 112.1, [93.5, 114.7, 112.1]),
            row(script.VLLM, "fp32", 1, 15.1),  # one round, one load only: not drawn
            ]
    script.plot_run(rows, tmp_path / "x.png")
    assert drawn["groups"] == ["1 stream", "16 streams"]
    assert drawn["series"] == {"hexgen serve: one replica, one process": [15.0, 112.1]}
    assert drawn["spans"] == {"hexgen serve: one replica, one process": [(14.8, 17.3), (93.5, 114.7)]}


def test_plot_bars_writes_a_png(tmp_path):
    from hexgen.sim.plots import plot_bars

    out = plot_bars(tmp_path / "figures" / "bars.png", ["1 stream", "16 streams"], {"a": [1.0, 2.0], "b": [3.0, 4.0]},
                    ylabel="tok/s", title="t", spans={"a": [(0.5, 1.5), (1.5, 2.5)]})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_round_by_round_ratios_pair_servers_by_weights_too():
    script = load_script("bench_serve_all.py")
    rows = [row(script.HEXGEN_ONE, "fp32", 1, 20, [20, 30]), row(script.VLLM, "fp32", 1, 10, [10, 20]),
            row(script.HEXGEN_ONE, "bf16", 1, 40, [40, 60]), row(script.VLLM, "bf16", 1, 50, [50, 40])]
    lines = script.versus(rows).splitlines()
    assert lines == [
        "- hexgen one process / vLLM, output tok/s round by round: at 1 stream 2.00, 1.50 (median 1.50).",
        "- hexgen one process in bf16 / vLLM in bf16, output tok/s round by round: at 1 stream 0.80, 1.50 "
        "(median 0.80).",
        "- hexgen one process, bf16 / fp32, output tok/s round by round: at 1 stream 2.00, 2.00 (median 2.00).",
    ]
