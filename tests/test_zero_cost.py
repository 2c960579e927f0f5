"""Zero-cost proxies: finite on a tiny model, batched over inits, monotone synflow, errors."""

import math

import pytest

from nasjax.measure.zero_cost import HIGHER_IS_BETTER, PROXIES, zero_cost_proxies
from nasjax.models import get_spec


def tiny_gpt2(d_inners=(128, 256)):
    return get_spec("gpt2", "tiny", vocab_size=64, max_len=32, n_heads=[2, 4], d_inners=list(d_inners))


@pytest.fixture(scope="module")
def two_inits():
    # One jitted call: all four proxies for two initialisations.
    return zero_cost_proxies(tiny_gpt2(), seq_len=16, batch=4, n_inits=2)


def test_all_proxies_are_finite_with_std_over_inits(two_inits):
    assert set(two_inits) == set(PROXIES) | {f"{name}_std" for name in PROXIES}
    for name, value in two_inits.items():
        assert isinstance(value, float) and math.isfinite(value), (name, value)
    assert two_inits["grad_norm"] > 0 and two_inits["snip"] > 0 and two_inits["synflow"] > 0
    # jacob_cov <= -batch (= -4 here): the score of a perfectly uncorrelated batch is -B.
    assert two_inits["jacob_cov"] < -4
    for name in PROXIES:
        assert two_inits[f"{name}_std"] > 0  # independent inits give different scores


def test_higher_is_better_convention_covers_every_proxy():
    assert set(HIGHER_IS_BETTER) == set(PROXIES) and all(HIGHER_IS_BETTER.values())


def test_synflow_grows_with_width():
    one_layer = lambda d_inner: get_spec("gpt2", "tiny", vocab_size=64, max_len=32, n_heads=[2], d_inners=[d_inner])
    narrow = zero_cost_proxies(one_layer(128), seq_len=16, names="synflow")
    wide = zero_cost_proxies(one_layer(1024), seq_len=16, names="synflow")
    assert set(narrow) == {"synflow"}
    assert wide["synflow"] > narrow["synflow"] > 0


def test_unknown_proxy_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown zero-cost proxy 'fisher'") as info:
        zero_cost_proxies(tiny_gpt2(), seq_len=16, names=("grad_norm", "fisher"))
    for name in PROXIES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"names": ()}, "no zero-cost proxy"),
        ({"n_inits": 0}, "n_inits must be >= 1"),
        ({"batch": 1, "names": "jacob_cov"}, "batch must be >= 2"),
        ({"seq_len": 1}, "seq_len must be >= 2"),
        ({"seq_len": 64}, "exceeds max_len=32"),
        ({"seed": 1.5}, "seed must be an int"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"seq_len": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        zero_cost_proxies(tiny_gpt2(), **args)
