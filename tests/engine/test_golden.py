"""The oracle reproduces dllm's MDLM sampler exactly on every golden case (real outputs of dllm)."""

import filecmp
import json
import os

import pytest
import torch

from diffutron_engine import ReferenceParams
from diffutron_engine.loading import load_model
from diffutron_engine.reference import ReferenceSampler
from where import GOLDEN, ROOT

SHARED = os.path.join(ROOT, "..", "shared", "golden", "mdlm-tiny")
CASES = json.load(open(os.path.join(GOLDEN, "cases.json")))["cases"]


@pytest.fixture(scope="module")
def sampler():
    lm = load_model(os.path.join(GOLDEN, "model"), dtype="float32", device="cpu")
    return ReferenceSampler(model=lm.model, tokenizer=lm.tokenizer)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case(sampler, case):
    config = ReferenceParams(return_dict=True, **case["config"])
    torch.manual_seed(case["seed"])
    run = sampler.infill if case.get("kind") == "infill" else sampler.sample
    out = run(case["prompts"], config)
    assert out.sequences.tolist() == case["expected"]
    if "num_histories" in case:
        assert len(out.histories) == case["num_histories"]
    assert torch.equal(out.histories[-1], out.sequences)


def test_golden_copy_matches_shared():
    """The project's copy of the golden data must stay identical to ../shared (when it is there)."""
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/golden is not beside this checkout")
    for rel in ["cases.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json",
                "model/tokenizer_config.json"]:
        assert filecmp.cmp(os.path.join(GOLDEN, rel), os.path.join(SHARED, rel), shallow=False), rel
