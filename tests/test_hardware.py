"""Hardware measurement (LTS latency / peak memory): structure only, never timing thresholds."""

import json

import jax
import pytest

from nasjax.measure.hardware import (
    HardwareMeasurement,
    compiled_memory_bytes,
    device_peak_delta,
    measure_hardware,
)
from nasjax.models import get_spec


def tiny_gpt2(max_len=256):
    return get_spec("gpt2", "tiny", vocab_size=64, max_len=max_len, n_heads=[2, 4], d_inners=[128, 256])


@pytest.fixture(scope="module")
def short_and_long():
    spec = tiny_gpt2()
    return (
        measure_hardware(spec, seq_len=16, repeats=3, warmup=1),
        measure_hardware(spec, seq_len=256, repeats=4, warmup=0),
    )


def test_measurement_fields(short_and_long):
    m, _ = short_and_long
    assert isinstance(m, HardwareMeasurement)
    assert m.repeats == 3
    assert m.latency_s > 0 and m.latency_mean_s > 0 and m.latency_std_s >= 0
    assert m.compile_seconds > 0
    assert m.peak_memory_bytes > 0
    assert m.flops is None or m.flops > 0
    assert m.backend.startswith(jax.default_backend())
    if jax.default_backend() == "cpu":
        assert m.device_peak_bytes is None  # the CPU client reports no allocator statistics
        assert m.flops > 0
    d = m.to_dict()
    assert d["repeats"] == 3 and set(d) == {f.name for f in m.__dataclass_fields__.values()}
    json.dumps(d)


def test_repeats_honoured_and_memory_grows_with_seq_len(short_and_long):
    short, long = short_and_long
    assert long.repeats == 4
    assert long.peak_memory_bytes > short.peak_memory_bytes
    assert long.flops is None or long.flops > short.flops


def test_compiled_memory_bytes_without_analysis():
    class NoAnalysis:
        def memory_analysis(self):
            raise NotImplementedError

    assert compiled_memory_bytes(NoAnalysis()) == {}


def test_device_peak_delta():
    before = {"bytes_in_use": 100, "peak_bytes_in_use": 500}
    assert device_peak_delta(before, {"bytes_in_use": 150, "peak_bytes_in_use": 900}) == 800
    assert device_peak_delta(before, {"bytes_in_use": 150, "peak_bytes_in_use": 500}) is None  # masked
    assert device_peak_delta(None, None) is None  # CPU: no statistics
    assert device_peak_delta({"bytes_in_use": 1}, {"bytes_in_use": 2}) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"batch": 0}, "batch must be >= 1"),
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"seq_len": 512}, "exceeds max_len=256"),
        ({"repeats": 2.0}, "repeats must be an int"),
        ({"device": "cpu"}, "device must be a jax.Device"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"seq_len": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        measure_hardware(tiny_gpt2(), **args)
