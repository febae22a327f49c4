"""Per-layer plans: clamps, protected layers, the mean ratio, unit rounding, parameter targets."""

import pytest

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.architecture import LayerShape
from llmprune.engine.pruning.allocate.budget import resolve_budget
from llmprune.engine.pruning.allocate.plan import (
    LayerUnits,
    PlanOptions,
    layer_rates,
    unit_counts,
)

SCORES = [5.0, 0.9, 0.2, 0.1, 0.3, 0.05, 0.4, 0.8, 1.2, 3.0]  # U-shaped, like real models


def _mean(rates, options):
    prunable = options.prunable(len(rates))
    return sum(rates[i] for i in prunable) / len(prunable)


@pytest.mark.parametrize("strategy", ["inverse", "proportional", "uniform"])
@pytest.mark.parametrize("ratio,min_rate,max_rate", [(0.2, 0.0, 0.8), (0.3, 0.1, 0.4), (0.5, 0.05, 0.9)])
def test_rates_respect_clamps_protection_and_mean(strategy, ratio, min_rate, max_rate):
    options = PlanOptions(
        ratio=ratio, strategy=strategy, alpha=3.0, min_rate=min_rate, max_rate=max_rate, layer_start=2, layer_end=9
    )
    rates = layer_rates(SCORES, options)
    assert rates[0] == rates[1] == rates[9] == 0.0
    assert all(min_rate - 1e-9 <= rates[i] <= max_rate + 1e-9 for i in range(2, 9))
    assert _mean(rates, options) == pytest.approx(ratio, abs=1e-6)


def test_inverse_prunes_important_layers_less_and_alpha_sharpens():
    mild = layer_rates(SCORES, PlanOptions(ratio=0.3, alpha=1.0))
    sharp = layer_rates(SCORES, PlanOptions(ratio=0.3, alpha=4.0))
    # layer 5 (least important prunable) vs layer 8 (most important prunable)
    assert mild[5] > mild[8] and sharp[5] > sharp[8]
    assert sharp[5] - sharp[8] > mild[5] - mild[8]
    ordering = sorted(range(1, 9), key=lambda i: SCORES[i])
    assert [sharp[i] for i in ordering] == sorted((sharp[i] for i in ordering), reverse=True)


def test_alpha_zero_and_proportional_directions():
    flat = layer_rates(SCORES, PlanOptions(ratio=0.25, alpha=0.0))
    assert all(flat[i] == pytest.approx(0.25) for i in range(1, 9))
    proportional = layer_rates(SCORES, PlanOptions(ratio=0.25, strategy="proportional", alpha=2.0))
    assert proportional[8] > proportional[5]


def test_default_protects_first_and_last_layer():
    rates = layer_rates(SCORES, PlanOptions(ratio=0.2))
    assert rates[0] == 0 and rates[-1] == 0 and all(r > 0 for r in rates[1:-1])


@pytest.mark.parametrize(
    "options,message",
    [
        (PlanOptions(ratio=1.0), "--ratio"),
        (PlanOptions(ratio=-0.1), "--ratio"),
        (PlanOptions(min_rate=0.5, max_rate=0.2), "min-pruning-rate"),
        (PlanOptions(layer_start=5, layer_end=5), "layer range"),
        (PlanOptions(layer_start=0, layer_end=11), "layer range"),
        (PlanOptions(ratio=0.6, max_rate=0.5), "cannot be met"),
        (PlanOptions(ratio=0.1, min_rate=0.2), "cannot be met"),
        (PlanOptions(strategy="random"), "strategy"),
    ],
)
def test_impossible_plans_are_user_errors(options, message):
    with pytest.raises(UserInputError, match=message):
        layer_rates(SCORES, options)


def _shapes(n, heads=9, kv=3, width=1536):
    return [LayerShape(heads, kv, 64, width) for _ in range(n)]


def test_attention_groups_are_apportioned_to_match_the_plan_total():
    rates = [0.0, 0.2, 0.25, 0.3, 0.15, 0.1, 0.0]
    units = unit_counts(rates, _shapes(7), attn_unit="group")
    removed = sum(3 - u.kv_heads for u in units)
    assert removed == round(sum(r * 3 for r in rates))
    assert units[0].kv_heads == 3 and units[6].kv_heads == 3
    assert all(u.heads == 3 * u.kv_heads for u in units)  # q:kv stays 3:1


def test_a_layer_always_keeps_one_group_and_query_units_stay_even():
    units = unit_counts([0.99, 0.99], _shapes(2), attn_unit="group")
    assert all(u.kv_heads == 1 for u in units)
    query = unit_counts([0.5, 0.99], _shapes(2), attn_unit="query")
    assert all(u.kv_heads == 3 and u.heads % 3 == 0 and u.heads >= 3 for u in query)


def test_mlp_widths_round_to_multiples():
    units = unit_counts([0.0, 0.23, 0.5], _shapes(3), prune_mlp=True, round_to=64)
    assert units[0].intermediate_size == 1536
    assert all(u.intermediate_size % 64 == 0 for u in units[1:])
    assert units[2].intermediate_size == 768


def test_same_in_every_layer_gives_equal_shapes():
    units = unit_counts([0.2] * 6, _shapes(6), prune_mlp=True, same_in_every_layer=True)
    assert len({(u.kv_heads, u.intermediate_size) for u in units}) == 1


def test_unit_counts_without_mlp_keep_widths():
    assert unit_counts([0.4], _shapes(1))[0] == LayerUnits(kv_heads=2, heads=6, intermediate_size=1536)


@pytest.mark.parametrize(
    "text,expected", [("6.5B", 6_500_000_000), ("110M", 110_000_000), ("0.8", 8_000_000_000), ("1e9", 1_000_000_000)]
)
def test_parse_target_params(text, expected):
    assert resolve_budget(None, text).target(10_000_000_000) == expected


@pytest.mark.parametrize("text", ["abc", "0", "20B", "-1"])
def test_bad_target_params(text):
    with pytest.raises(UserInputError):
        resolve_budget(None, text).target(10_000_000_000)
