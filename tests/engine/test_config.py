import pytest

from diffutron_engine import PRESETS, DiffutronError, ReferenceParams, SamplingParams


def test_defaults_are_dllm_mdlm_defaults():
    c = ReferenceParams()
    assert (c.max_new_tokens, c.max_length, c.block_size, c.steps, c.temperature) == (128, None, 128, 128, 0.0)
    assert (c.remasking, c.stochastic_transfer, c.cfg_scale, c.right_shift_logits) == ("low_confidence", False, 0.0, False)
    assert (c.repetition_penalty, c.stop_strings, c.return_dict) == (1.0, None, False)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=0), "steps must be >= 1"),
        (dict(block_size=0), "block_size must be >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=-3), "max_new_tokens must be >= 0"),
        (dict(remasking="lowest"), "unknown remasking 'lowest'"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
        (dict(cfg_scale=-1), "cfg_scale must be >= 0"),
        (dict(suppress_tokens=[1, -2]), "suppress_tokens must be a list"),
        (dict(stop_strings=[""]), "stop_strings must be a non-empty string"),
        (dict(stop_strings={"a": 1}), "stop_strings must be a non-empty string or a list"),
        (dict(stochastic_transfer="no"), "stochastic_transfer must be true or false"),
        (dict(cfg_scale=1e308), "cfg_scale=1e\\+308 is outside float32's range"),
        (dict(repetition_penalty=1e-320), "repetition_penalty=.* is outside float32's range"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(steps=100_000_000), "steps must be <= 16,384, got 100,000,000"),
        (dict(temperature=1e308), "temperature must be <= 100, got 1e\\+308"),
        (dict(temperature=100.5), "temperature must be <= 100"),
    ],
)
def test_invalid_values_name_the_problem(kwargs, message):
    with pytest.raises(DiffutronError, match=message):
        ReferenceParams(**kwargs)


def test_the_bounds_are_inclusive_and_shared_with_sampling_params():
    from diffutron_engine import SamplingParams
    from diffutron_engine.config import MAX_STEPS, MAX_TEMPERATURE

    c = ReferenceParams(steps=MAX_STEPS, temperature=MAX_TEMPERATURE)
    assert (c.steps, c.temperature) == (MAX_STEPS, MAX_TEMPERATURE)
    # the engine's (and the server's) parameters go through the same checks
    with pytest.raises(DiffutronError, match="steps must be <= 16,384"):
        SamplingParams(steps=MAX_STEPS + 1)
    with pytest.raises(DiffutronError, match="temperature must be <= 100"):
        SamplingParams(temperature=1e308)
    with pytest.raises(DiffutronError, match="temperature must be <= 100"):
        SamplingParams().override(temperature=101)


def test_max_length_instead_of_max_new_tokens():
    c = ReferenceParams(max_new_tokens=None, max_length=64)
    assert c.max_length == 64


def test_override_validates_and_rejects_unknown_names():
    c = ReferenceParams().override(steps=8, temperature=0.5)
    assert (c.steps, c.temperature) == (8, 0.5)
    with pytest.raises(DiffutronError, match="unknown sampler option"):
        ReferenceParams().override(stepz=8)
    with pytest.raises(DiffutronError, match="steps must be >= 1"):
        ReferenceParams().override(steps=0)


def test_presets_are_the_published_settings():
    long = ReferenceParams(**PRESETS["diffutron-long"])
    assert (long.steps, long.temperature, long.block_size, long.repetition_penalty) == (128, 0.1, 32, 1.2)
    short = ReferenceParams(**PRESETS["diffutron-short"])
    assert (short.steps, short.remasking, short.stochastic_transfer, short.cfg_scale) == (64, "low_confidence", False, 0.0)


def test_the_shared_knobs_are_declared_once():
    """The oracle's and a request's parameters extend one declaration of dllm's knobs: the same names,
    defaults and checks on both sides, and knobs() carries them from one to the other."""
    import dataclasses

    from diffutron_engine.config import SamplingKnobs

    shared = {f.name for f in dataclasses.fields(SamplingKnobs)}
    assert shared <= {f.name for f in dataclasses.fields(ReferenceParams)}
    assert shared <= {f.name for f in dataclasses.fields(SamplingParams)}
    params = SamplingParams(max_new_tokens=7, steps=9, temperature=0.5, stop_strings="x", threshold=0.9, seed=3)
    oracle = ReferenceParams(**params.knobs())
    assert oracle.knobs() == params.knobs() and oracle.stop_strings == ["x"]
    with pytest.raises(DiffutronError, match="max_new_tokens must be >= 1"):
        SamplingParams(max_new_tokens=0)  # no max_length on the engine's side
    with pytest.raises(DiffutronError, match="unknown sampling parameter"):
        SamplingParams().override(max_length=5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_batch=0), "max_batch must be >= 1"),
    (dict(max_batch=True), "max_batch must be an integer"),
    (dict(cache="full"), "unknown cache 'full'"),
    (dict(cuda_graphs="yes"), "cuda_graphs must be true or false"),
    (dict(fused_head=1), "fused_head must be true or false"),
    (dict(dtype="float8"), "unknown dtype 'float8'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(device="cuda:x"), "unknown device 'cuda:x'"),
    (dict(device=0), "unknown device 0"),
])
def test_engine_config_refuses_bad_settings_by_name(kwargs, message):
    from diffutron_engine import EngineConfig

    with pytest.raises(DiffutronError, match=message):
        EngineConfig(**kwargs)


def test_engine_config_override_and_presets():
    from diffutron_engine import FAST, EngineConfig, Preset

    c = EngineConfig(max_batch=4, device="cuda:1")
    assert c.override(cache="dual") == EngineConfig(max_batch=4, device="cuda:1", cache="dual")
    with pytest.raises(DiffutronError, match="unknown engine setting"):
        c.override(threshold=0.9)  # a request's knob is not the engine's
    # the fast preset is one (engine, request) pair, each side checked where it is declared
    assert FAST.engine_config() == EngineConfig(cache="dual")
    assert FAST.engine_config(c, cache="prefix", cuda_graphs=None) == c.override(cache="prefix")
    assert SamplingParams(**FAST.request).threshold == 0.9
    assert FAST.describe() == "cache=dual, threshold=0.9"
    with pytest.raises(DiffutronError, match="unknown engine setting"):
        Preset(engine={"threshold": 0.9})
    with pytest.raises(DiffutronError, match="threshold must be in"):
        Preset(request={"threshold": 2})


def test_parameters_are_given_by_name():
    """By name only: SamplingParams(64, 32) would otherwise set a knob the caller did not mean."""
    from diffutron_engine import EngineConfig

    for cls in (SamplingParams, ReferenceParams, EngineConfig):
        with pytest.raises(TypeError, match="positional"):
            cls(64)
