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


# ---------------------------------------------------------------- programs="sublayers" / "layers"
def _lts_spec(d_inners, n_heads, d_model=64):
    return get_spec(
        "gpt2",
        "tiny",
        vocab_size=64,
        max_len=64,
        d_model=d_model,
        n_heads=n_heads,
        d_inners=d_inners,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )


def test_sublayer_chain_computes_the_model():
    """embedding -> each layer's mixer and FFN sub-layer -> head equals Transformer.apply."""
    import jax.numpy as jnp
    import numpy as np

    from nasjax.models.transformer import Segments, build

    spec = _lts_spec([128, 192, 256], [2, 4, 8])
    model, seg = build(spec), Segments(spec)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    params = model.init({"params": jax.random.key(1)}, tokens)["params"]
    want = model.apply({"params": params}, tokens)
    x = seg.embed(params["embed"], tokens)
    for i in range(seg.n_layers):
        layer_params = seg.layer_params(params, i)
        assert seg.sublayer_parts(i) == ("mixer", "ffn")
        by_layer = seg.layer(i, layer_params, x)
        for part in seg.sublayer_parts(i):
            x = seg.sublayer(i, part, seg.sublayer_params(layer_params, part), x)
        np.testing.assert_allclose(x, by_layer, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(seg.logits(seg.head_params(params), x), want, rtol=1e-5, atol=1e-5)
    # keys: what a sub-layer computes, not where it sits (layers 0 and 1 differ in both parts)
    assert seg.sublayer_key(0, "mixer") != seg.sublayer_key(1, "mixer")
    assert seg.sublayer_key(0, "ffn") != seg.sublayer_key(1, "ffn")
    other = Segments(_lts_spec([256, 128], [8, 2]))
    assert other.sublayer_key(0, "ffn") == seg.sublayer_key(2, "ffn")
    assert other.sublayer_key(1, "mixer") == seg.sublayer_key(0, "mixer")


def test_pieces_are_shared_across_architectures():
    from nasjax.measure import hardware

    hardware.clear_pieces()
    first = measure_hardware(_lts_spec([128, 192], [2, 4]), seq_len=16, repeats=2, warmup=1, programs="sublayers")
    # embedding, 2 x (mixer, FFN), head: all new
    assert first.programs == "sublayers" and first.pieces == 6 and first.compiled_pieces == 6
    assert first.compile_seconds > 0
    # the same mixers, one FFN width new (and one layer more): only that FFN compiles
    again = measure_hardware(
        _lts_spec([192, 128, 320], [4, 2, 2]), seq_len=16, repeats=2, warmup=1, programs="sublayers"
    )
    assert again.pieces == 8 and again.compiled_pieces == 1
    same = measure_hardware(_lts_spec([128, 192], [2, 4]), seq_len=16, repeats=2, warmup=1, programs="sublayers")
    assert same.compiled_pieces == 0 and same.compile_seconds == 0.0
    by_layer = measure_hardware(_lts_spec([128, 192], [2, 4]), seq_len=16, repeats=2, warmup=1, programs="layers")
    # whole-layer pieces are keyed apart from sub-layers; the embedding and head are shared
    assert by_layer.pieces == 4 and by_layer.compiled_pieces == 2


@pytest.mark.parametrize("programs, dropout", [("sublayers", False), ("layers", False), ("sublayers", True)])
def test_piece_measurement_agrees_with_the_model_program(programs, dropout):
    """Same FLOPs (the same operations run), memory of the same order, a latency of the
    same order (never a timing threshold tighter than 10x). Dropout is off in inference."""
    spec = tiny_gpt2() if dropout else _lts_spec([128, 256], [2, 8])
    whole = measure_hardware(spec, seq_len=32, repeats=3, warmup=1)
    pieces = measure_hardware(spec, seq_len=32, repeats=3, warmup=1, programs=programs)
    assert whole.programs == "model" and whole.pieces == 1
    if jax.default_backend() == "cpu":
        assert pieces.flops == pytest.approx(whole.flops, rel=1e-6)
    assert 0 < pieces.activation_memory_bytes < pieces.peak_memory_bytes
    # weights and the token ids are held whole either way
    weights_and_input = whole.peak_memory_bytes - whole.activation_memory_bytes
    assert pieces.peak_memory_bytes - pieces.activation_memory_bytes == weights_and_input
    assert 0.25 < pieces.activation_memory_bytes / whole.activation_memory_bytes < 4
    assert 0.1 < pieces.latency_s / whole.latency_s < 10


def test_piece_registry_is_bounded():
    from nasjax.measure import hardware

    hardware.clear_pieces()
    try:
        hardware.set_max_pieces(3)
        m = measure_hardware(_lts_spec([128, 192], [2, 4]), seq_len=16, repeats=1, warmup=0, programs="sublayers")
        assert m.compiled_pieces == 6 and len(hardware._PIECES) == 3
        with pytest.raises(ValueError, match="max_pieces must be >= 1"):
            hardware.set_max_pieces(0)
    finally:
        hardware.set_max_pieces(hardware.DEFAULT_MAX_PIECES)
        hardware.clear_pieces()


@pytest.mark.parametrize("programs", ["sublayers", "layers"])
def test_precompiled_pieces_are_the_ones_measurements_compile(programs):
    """precompile_pieces (an LTS population's pieces, compiled on threads ahead of its
    measurements) compiles exactly what measuring the specs would: afterwards their
    measurements compile nothing; a second call compiles nothing; one thread, the
    ``model`` setting or a spec that cannot be cut does nothing; at most half the
    registry's bound is compiled ahead."""
    from nasjax.measure import hardware

    specs = [_lts_spec([128, 192], [2, 4]), _lts_spec([192, 320], [4, 2]), _lts_spec([96], [2], d_model=32)]
    hardware.clear_pieces()
    try:
        for noop in (dict(threads=1), dict(programs="model")):
            kwargs = {"programs": programs, "threads": 2, **noop}
            assert hardware.precompile_pieces(specs, 16, **kwargs)["pieces"] == 0 and len(hardware._PIECES) == 0
        stopped = hardware.precompile_pieces(specs, 16, programs=programs, threads=2, should_stop=lambda: True)
        assert stopped["pieces"] == 0 and len(hardware._PIECES) == 0  # a stop skips what has not started
        expected = sum(measure_hardware(s, seq_len=16, repeats=1, programs=programs).compiled_pieces for s in specs)
        hardware.clear_pieces()
        bert = get_spec("bert", "tiny", vocab_size=64, max_len=64)  # an MLM head: not cut, skipped
        ahead = hardware.precompile_pieces(specs + [bert], 16, programs=programs, threads=2)
        assert (
            ahead["pieces"] == expected == len(hardware._PIECES) and ahead["seconds"] > 0 and ahead["xla_seconds"] > 0
        )
        for spec in specs:
            m = measure_hardware(spec, seq_len=16, repeats=1, warmup=0, programs=programs)
            assert m.compiled_pieces == 0 and m.latency_s > 0
        assert hardware.precompile_pieces(specs, 16, programs=programs, threads=2)["pieces"] == 0
        # the bound: new pieces fit it (here 4), and the pieces a population needs that the
        # registry holds are kept (refreshed), not evicted by what is compiled ahead
        hardware.clear_pieces()
        hardware.set_max_pieces(4)
        assert hardware.precompile_pieces(specs, 16, programs=programs, threads=2)["pieces"] == 4
        hardware.clear_pieces()
        measure_hardware(specs[0], seq_len=16, repeats=1, programs=programs)
        held = set(hardware._PIECES)
        assert len(held) == 4
        assert hardware.precompile_pieces(specs[::-1], 16, programs=programs, threads=2)["pieces"] == 0
        assert set(hardware._PIECES) == held
        with pytest.raises(ValueError, match="threads must be >= 1"):
            hardware.precompile_pieces(specs, 16, threads=0)
    finally:
        hardware.set_max_pieces(hardware.DEFAULT_MAX_PIECES)
        hardware.clear_pieces()


def test_pieces_refuse_models_they_cannot_cut():
    spec = get_spec("bert", "tiny", vocab_size=64, max_len=64)  # an MLM head
    with pytest.raises(ValueError, match="cuts the forward into pieces.*head 'mlm'"):
        measure_hardware(spec, seq_len=16, repeats=1, programs="sublayers")
    with pytest.raises(ValueError, match="programs must be one of"):
        measure_hardware(tiny_gpt2(), seq_len=16, programs="kernels")


def test_compile_meter_counts_this_threads_compiles():
    import threading

    import jax.numpy as jnp

    from nasjax import compile_meter

    compile_meter.install()
    compile_meter.install()  # idempotent
    t0, p0 = compile_meter.thread_seconds(), compile_meter.process_seconds()
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25).lower(jnp.zeros((7, 3))).compile()
    mine = compile_meter.thread_seconds() - t0
    assert mine > 0 and compile_meter.process_seconds() - p0 >= mine
    seen = []
    worker = threading.Thread(target=lambda: seen.append(compile_meter.thread_seconds()))
    worker.start()
    worker.join()
    assert seen == [0.0]  # another thread's compiles are its own
