import pytest

from diffutron_engine import PRESETS, DiffutronError, SamplerConfig


def test_defaults_are_dllm_mdlm_defaults():
    c = SamplerConfig()
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
        SamplerConfig(**kwargs)


def test_the_bounds_are_inclusive_and_shared_with_sampling_params():
    from diffutron_engine import SamplingParams
    from diffutron_engine.config import MAX_STEPS, MAX_TEMPERATURE

    c = SamplerConfig(steps=MAX_STEPS, temperature=MAX_TEMPERATURE)
    assert (c.steps, c.temperature) == (MAX_STEPS, MAX_TEMPERATURE)
    # the engine's (and the server's) parameters go through the same checks
    with pytest.raises(DiffutronError, match="steps must be <= 16,384"):
        SamplingParams(steps=MAX_STEPS + 1)
    with pytest.raises(DiffutronError, match="temperature must be <= 100"):
        SamplingParams(temperature=1e308)
    with pytest.raises(DiffutronError, match="temperature must be <= 100"):
        SamplingParams().override(temperature=101)


def test_max_length_instead_of_max_new_tokens():
    c = SamplerConfig(max_new_tokens=None, max_length=64)
    assert c.max_length == 64


def test_override_validates_and_rejects_unknown_names():
    c = SamplerConfig().override(steps=8, temperature=0.5)
    assert (c.steps, c.temperature) == (8, 0.5)
    with pytest.raises(DiffutronError, match="unknown sampler option"):
        SamplerConfig().override(stepz=8)
    with pytest.raises(DiffutronError, match="steps must be >= 1"):
        SamplerConfig().override(steps=0)


def test_presets_are_the_published_settings():
    long = SamplerConfig(**PRESETS["diffutron-long"])
    assert (long.steps, long.temperature, long.block_size, long.repetition_penalty) == (128, 0.1, 32, 1.2)
    short = SamplerConfig(**PRESETS["diffutron-short"])
    assert (short.steps, short.remasking, short.stochastic_transfer, short.cfg_scale) == (64, "low_confidence", False, 0.0)
