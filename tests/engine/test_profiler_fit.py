"""The model fit of `hexgen profile --model`: least squares on the cost model's residuals, checked by hand."""

from __future__ import annotations

import pytest

from hexgen.engine.profiler import fit_batches, fit_overheads


def test_a_residual_linear_in_the_batch_is_recovered_exactly():
    # 1.2 ms a step plus 4 µs a sequence, over 32 layers: 0.0375 ms a layer, 0.000125 ms a sequence and layer.
    residual_s = {b: 1.2e-3 + b * 4e-6 for b in (1, 8, 64)}
    fitted = fit_overheads(residual_s, 32)
    assert fitted["layer_overhead_ms"] == pytest.approx(0.0375)
    assert fitted["seq_overhead_ms"] == pytest.approx(0.000125)


def test_noise_is_averaged_by_least_squares():
    # residuals 1.0, 1.3, 1.3 ms at batches 1, 2, 3; by hand: mean batch 2, mean residual 1.2 ms, slope
    # ((-1)(-0.2) + 0 + (1)(0.1)) / 2 = 0.15 ms a sequence, intercept 1.2 - 2 x 0.15 = 0.9 ms.
    fitted = fit_overheads({1: 1.0e-3, 2: 1.3e-3, 3: 1.3e-3}, 1)
    assert fitted["layer_overhead_ms"] == pytest.approx(0.9)
    assert fitted["seq_overhead_ms"] == pytest.approx(0.15)


def test_steps_growing_slower_than_the_model_get_no_per_sequence_overhead():
    fitted = fit_overheads({1: 2.0e-3, 8: 1.8e-3, 64: 1.6e-3}, 10)
    assert fitted["seq_overhead_ms"] == 0.0
    assert fitted["layer_overhead_ms"] == pytest.approx(0.18)  # the mean residual, 1.8 ms, over 10 layers


def test_a_negative_residual_means_no_fixed_overhead():
    assert fit_overheads({1: -1e-3, 8: -1e-3 + 7e-6}, 4)["layer_overhead_ms"] == 0.0


def test_gpu_steps_are_fitted_over_tens_of_sequences():
    assert max(fit_batches("cuda")) >= 32 and min(fit_batches("cuda")) == 1
    assert fit_batches("cpu") == (1, 8)
