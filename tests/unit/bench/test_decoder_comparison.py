"""Comparing decoders: every decoder sees the same items, and each difference to the baseline
comes with a paired interval that holds the observed difference."""

import pytest

from mmscope.bench.decoders import compare_decoders


def test_paired_intervals_hold_the_observed_differences(toy_llava):
    result = compare_decoders(
        toy_llava,
        ["sampling"],
        n_images=12,
        splits=("adversarial",),
        n_captions=6,
        n_answers=20,
        batch_size=20,
    )
    assert result["baseline"] == "greedy" and set(result["decoders"]) == {"greedy", "sampling"}
    greedy, sampled = result["decoders"]["greedy"], result["decoders"]["sampling"]
    assert "f1_gain_ci" not in greedy["adversarial"]  # the baseline is not compared to itself
    assert greedy["adversarial"]["n"] == sampled["adversarial"]["n"]  # the same probes
    gain = sampled["adversarial"]["f1"] - greedy["adversarial"]["f1"]
    lo, hi = sampled["adversarial"]["f1_gain_ci"]
    assert lo - 1e-9 <= gain <= hi + 1e-9
    change = sampled["chair"]["chair_i"] - greedy["chair"]["chair_i"]
    lo, hi = sampled["chair"]["chair_i_change_ci"]
    assert lo - 1e-9 <= change <= hi + 1e-9
    accuracy = sampled["answers"]["accuracy"] - greedy["answers"]["accuracy"]
    lo, hi = sampled["answers"]["accuracy_change_ci"]
    assert lo - 1e-9 <= accuracy <= hi + 1e-9
    assert 0 <= greedy["answers"]["accuracy"] <= 1 and greedy["answers"]["n"] == 20


def test_an_unknown_decoder_fails_before_any_work(toy_llava):
    from mmscope.core.errors import RegistryError

    started = []
    with pytest.raises(RegistryError, match="unknown decoder"):
        compare_decoders(toy_llava, ["nope"], n_images=2, progress=started.append)
    assert started == []
