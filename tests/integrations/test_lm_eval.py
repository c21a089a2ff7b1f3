"""The lm-evaluation-harness model `diffutron` and the Monte-Carlo likelihood behind it.

The batched estimator is checked against the plain one-request-at-a-time implementation (same seed,
same requests: same numbers within 1e-4 relative in float32), the noise draw by its definition (per
request: independent of order and split; the stream: the harness's), the
greedy check against a plain loop, generation against the engine's contract, bad input by its
messages; end to end through lm-eval's evaluator and `diffutron-engine eval lm-eval` on the task YAMLs
in tests/data/lm_eval (the CLI run in the slow tier: lm-eval's CLI indexes all its task folders), and with
two processes under torchrun (slow tier: the same samples and aggregates as one).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffutron_engine.errors import DiffutronError  # noqa: E402
from diffutron_engine.integrations import mc_likelihood as mc  # noqa: E402
from diffutron_engine.model.modernbert import ModernBert  # noqa: E402
from where import DATA

TASKS = os.path.join(DATA, "lm_eval")
PAIRS_TEXT = [("Türkiye'nin başkenti ", "Ankara'dır."), ("Hava bugün", " güneşli"),
              ("Çay, Türk kültüründe misafirperverliğin simgesidir. Bir dil modeli", " kelimelerin olasılıklarını öğrenir"),
              ("", "Merhaba dünya"), ("Bilgisayarlar verileri işler  ", "ve paylaşır.")]


class _Req:
    """The part of lm-eval's Instance the model reads."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    from diffutron_engine.integrations.lm_eval import DiffutronLM

    return DiffutronLM(pretrained=tiny_checkpoint, mc_num=8, batch_size=4, device="cpu", dtype="float32",
                       max_new_tokens=8, steps=8, block_size=8, token_budget=64)


def _rel(a, b):
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def test_noise_draw_follows_its_definition():
    torch.manual_seed(3)
    for length, copies in ((1, 4), (5, 4), (7, 32), (40, 3)):
        masks, ratios = mc.draw_masks(length, copies, "cpu")
        counts = masks.sum(1)
        assert masks.shape == (copies, length) and ((1 <= counts) & (counts <= length)).all()
        assert torch.equal(ratios, counts / length)
        # stratified: the counts are k, k + L/B, k + 2L/B, ... wrapped into 1..L, so they cover the range
        spread = sorted(counts.tolist())
        assert spread[-1] - spread[0] >= min(length - 1, (copies - 1) * length // copies) - 1 or length == 1


def _harness_draw(length, copies, device="cpu"):
    """The noise of one draw written out as the estimator's description reads (the method, not our code
    path): counts from a stratified linspace wrapped into 1..L, then for each copy the mask vector
    [1]*count + [0]*(L - count) reordered by a fresh random permutation."""
    k = torch.randint(1, length + 1, (), device=device)
    counts = torch.round(torch.linspace(float(k), k + (copies - 1) * (length / copies), steps=copies,
                                        device=device)).long()
    counts = ((counts - 1) % length) + 1
    base = torch.arange(length).repeat(copies, 1) < counts.cpu().unsqueeze(1)
    rows = []
    for i in range(copies):
        perm = torch.randperm(length)
        rows.append(base[i][perm])
    return torch.stack(rows), (counts.cpu() / length)


@pytest.mark.parametrize("length, copies", [(1, 4), (3, 32), (7, 4), (11, 5), (40, 3), (64, 32)])
def test_noise_draw_is_the_estimators(length, copies):
    """Same seed, same generator calls in the same order: the same masks and ratios as the description."""
    torch.manual_seed(length * 100 + copies)
    want = _harness_draw(length, copies)
    after_want = torch.rand(3)
    torch.manual_seed(length * 100 + copies)
    got = mc.draw_masks(length, copies, "cpu")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(torch.rand(3), after_want)  # and the generator is left where the description leaves it


def test_encode_pair_moves_trailing_spaces_and_splits_by_the_context_length(tiny):
    from tokenizers.processors import TemplateProcessing

    tok = tiny.tokenizer
    p = mc.encode_pair(tok, "Hava bugün  ", "güneşli")
    assert p.context == tok("Hava bugün")["input_ids"]
    assert p.context + p.target == tok("Hava bugün  güneşli")["input_ids"]
    # with special tokens around every encoding, the split is by the context's length (its eos included)
    framed = type(tok)(tokenizer_object=tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str()))
    framed.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A <eos>",
                                                                 special_tokens=[("<bos>", 2), ("<eos>", 1)])
    q = mc.encode_pair(framed, "Hava bugün", " güneşli")
    whole = framed("Hava bugün güneşli")["input_ids"]
    assert q.context[0] == 2 and q.context[-1] == 1 and q.target == whole[len(q.context):]


@pytest.mark.parametrize("budget", [16, 4096])
def test_batched_estimate_equals_the_plain_implementation(tiny, budget):
    """Same seed, same requests in the same order: the same numbers, however the copies are packed."""
    pairs = [mc.encode_pair(tiny.tokenizer, c, x) for c, x in PAIRS_TEXT]
    mask, pad = tiny.tokenizer.mask_token_id, tiny.tokenizer.pad_token_id
    torch.manual_seed(11)
    plain = mc.loglikelihood_plain(tiny.model, pairs, mask, mc_num=8, batch_size=4)
    torch.manual_seed(11)
    fast = mc.loglikelihood_batched(ModernBert(tiny.model), pairs, mask, pad, 8, 4, token_budget=budget)
    assert _rel(plain, fast) <= 1e-4
    assert all(v < 0 for v in fast)
    torch.manual_seed(12)  # another seed: other masks, other numbers (the draw is really used)
    assert mc.loglikelihood_batched(ModernBert(tiny.model), pairs, mask, pad, 8, 4) != fast


def test_the_estimate_converges_with_more_copies(tiny):
    """The estimator's spread shrinks as mc_num grows (a Monte-Carlo estimate, not a constant)."""
    pair = [mc.encode_pair(tiny.tokenizer, "Bir dil modeli", " kelimelerin olasılıklarını öğrenir ve yeni cümleler")]
    runner, mask, pad = ModernBert(tiny.model), tiny.tokenizer.mask_token_id, tiny.tokenizer.pad_token_id

    def spread(mc_num):
        vals = []
        for s in range(6):
            torch.manual_seed(s)
            vals += mc.loglikelihood_batched(runner, pair, mask, pad, mc_num, 4)
        return torch.tensor(vals).std().item()

    assert spread(64) < spread(4)


@pytest.mark.needs("lm_eval")
def test_loglikelihood_through_the_lm_class(lm, tiny):
    reqs = [_Req(c, x) for c, x in PAIRS_TEXT]
    torch.manual_seed(5)
    got = lm.loglikelihood(reqs)
    pairs = [mc.encode_pair(tiny.tokenizer, c, x) for c, x in PAIRS_TEXT]
    # the default noise: each request's own, from the model's seed (0) and its tokens
    plain = mc.loglikelihood_plain(tiny.model, pairs, tiny.tokenizer.mask_token_id, 8, 4, seed=0)
    assert _rel([g for g, _ in got], plain) <= 1e-4
    assert all(flag is False for _, flag in got)  # no greedy check unless asked


@pytest.mark.needs("lm_eval")
def test_greedy_check_matches_the_plain_loop(lm, tiny):
    """is_check_greedy: the engine's infill answers as the harness's one-token-per-step loop does, and a
    continuation equal to the model's own greedy fill is reported greedy."""
    mask = tiny.tokenizer.mask_token_id
    pairs = [mc.encode_pair(tiny.tokenizer, c, x) for c, x in PAIRS_TEXT]
    # the model's own greedy fill of 3 tokens after a context: greedy by construction
    ctx = pairs[2].context
    seq = ctx + [mask] * 3
    for _ in range(3):
        where = [i for i, t in enumerate(seq) if t == mask]
        probs = tiny.model(input_ids=torch.tensor([seq])).logits[0, where].softmax(-1)
        conf, tok = probs.max(-1)
        seq[where[int(conf.argmax())]] = int(tok[int(conf.argmax())])
    pairs.append(mc.Scored(ctx, seq[len(ctx):]))
    lm.is_check_greedy = True
    try:
        flags = lm._greedy(pairs)
    finally:
        lm.is_check_greedy = False
    assert flags == [mc.greedy_plain(tiny.model, p, mask) for p in pairs]
    assert flags[-1] is True
    # the check draws nothing from torch's generator: the estimates after it are unchanged
    reqs = [_Req(c, x) for c, x in PAIRS_TEXT]
    torch.manual_seed(9)
    lm.is_check_greedy = True
    try:
        with_check = [ll for ll, _ in lm.loglikelihood(reqs)] + [lm.loglikelihood(reqs[:1])[0][0]]
    finally:
        lm.is_check_greedy = False
    torch.manual_seed(9)
    without = [ll for ll, _ in lm.loglikelihood(reqs)] + [lm.loglikelihood(reqs[:1])[0][0]]
    assert with_check == without


@pytest.mark.needs("lm_eval")
def test_generate_until_cuts_at_until_and_honours_max_gen_toks(lm):
    reqs = [_Req("Soru: Türkiye'nin başkenti neresidir?\nCevap:", {"until": ["\n"], "max_gen_toks": 6}),
            _Req("Bir dil modeli", {"until": "a", "max_gen_toks": 4, "do_sample": False}),
            _Req("Hava bugün", {"max_gen_toks": 5, "do_sample": True, "temperature": 0.7})]
    engine, seen = lm.engine, []
    real = engine.generate

    def spy(prompts, params, **kw):
        seen.append(params)
        outs = real(prompts, params, **kw)
        seen.append(outs)
        return outs

    engine.generate = spy
    try:
        outs = lm.generate_until(reqs)
        again = lm.generate_until(reqs[:2])
    finally:
        del engine.generate
    params, raw = seen[0], seen[1]
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert "\n" not in outs[0] and "a" not in outs[1]
    assert [p.max_new_tokens for p in params] == [6, 4, 5] and [p.steps for p in params] == [6, 4, 5]
    assert [p.temperature for p in params] == [0.0, 0.0, 0.7]
    assert params[0].stop_strings == ["\n"] and params[1].stop_strings == ["a"] and params[2].stop_strings is None
    assert all(len(o.token_ids) <= p.max_new_tokens for o, p in zip(raw, params))
    assert again == outs[:2]  # greedy: deterministic


@pytest.mark.needs("lm_eval")
def test_loglikelihood_rolling_sums_windows(lm, tiny):
    """Rolling: windows of half the context, each scored after the half-context before it; the sum."""
    text = " ".join(["Kitap okumak insanın hayal gücünü geliştirir ve yeni dünyalar açar."] * 6)
    ids = tiny.tokenizer(text)["input_ids"]
    saved, lm.max_length = lm.max_length, 40  # windows of 20 tokens: several of them
    try:
        torch.manual_seed(2)
        got = lm.loglikelihood_rolling([_Req(text), _Req("")])
    finally:
        lm.max_length = saved
    windows = [mc.Scored(ids[max(0, lo - 20):lo], ids[lo:lo + 20]) for lo in range(0, len(ids), 20)]
    assert len(windows) >= 3
    plain = mc.loglikelihood_plain(tiny.model, windows, tiny.tokenizer.mask_token_id, 8, 4, seed=0)
    assert got[1] == 0.0 and abs(got[0] - sum(plain)) <= 1e-4 * abs(sum(plain))


@pytest.mark.needs("lm_eval")
def test_rolling_windows_hold_no_special_tokens(lm, tiny, monkeypatch):
    """With a tokenizer that frames every encoding (<bos> ... <eos>, as mmBERT's does), the rolling
    windows are the text's own tokens."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny.tokenizer
    framed = type(tok)(tokenizer_object=tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str()),
                       mask_token="<mask>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    framed.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A <eos>",
                                                                 special_tokens=[("<bos>", 2), ("<eos>", 1)])
    seen = []
    real = mc.loglikelihood_batched
    monkeypatch.setattr("diffutron_engine.integrations.lm_eval.loglikelihood_batched",
                        lambda runner, pairs, *a, **k: seen.extend(pairs) or real(runner, pairs, *a, **k))
    monkeypatch.setattr(lm, "tokenizer", framed)
    assert lm.loglikelihood_rolling([_Req("Hava bugün güneşli."), _Req("")])[1] == 0.0
    assert seen and all(2 not in p.context + p.target and 1 not in p.context + p.target for p in seen)


@pytest.mark.needs("lm_eval")
def test_chat_template_renders_diffutron_markers(lm):
    msgs = [{"role": "system", "content": "Kısa cevap ver."}, {"role": "user", "content": "Başkent?"}]
    assert lm.apply_chat_template(msgs).endswith("[Question]\nBaşkent?\n[/Question]\n\n[Answer]\n")
    cont = lm.apply_chat_template(msgs + [{"role": "assistant", "content": "Ank"}], add_generation_prompt=False)
    assert cont.endswith("[Answer]\nAnk")


@pytest.mark.parametrize("kwargs, message", [
    (dict(mc_num=10, batch_size=4), "multiple of batch_size"),
    (dict(mc_nmu=8), "did you mean 'mc_num'"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(temperature=-1), "temperature"),
])
@pytest.mark.needs("lm_eval")
def test_bad_model_arguments_are_named(tiny_checkpoint, kwargs, message):
    from diffutron_engine.integrations.lm_eval import DiffutronLM

    with pytest.raises(DiffutronError, match=message):
        DiffutronLM(pretrained=tiny_checkpoint, device="cpu", **kwargs)


@pytest.mark.needs("lm_eval")
def test_bad_requests_are_named(lm):
    with pytest.raises(DiffutronError, match="empty continuation"):
        lm.loglikelihood([_Req("Hava bugün", "")])
    with pytest.raises(DiffutronError, match="beyond the model's context of 512"):
        lm.loglikelihood([_Req("kelime " * 600, " güneşli")])
    with pytest.raises(DiffutronError, match="beyond the model's context"):
        lm.generate_until([_Req("kelime " * 600, {"max_gen_toks": 8})])


@pytest.mark.needs("lm_eval")
def test_lm_eval_arguments_lose_to_model_args(tiny_checkpoint):
    """lm-eval's CLI always sends its own batch_size (default 1) and device: --model_args win."""
    from diffutron_engine.integrations.lm_eval import DiffutronLM

    lm = DiffutronLM.create_from_arg_string(f"pretrained={tiny_checkpoint},mc_num=8,batch_size=4,device=cpu",
                                            {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert (lm.mc_num, lm.batch_size, lm.device) == (8, 4, "cpu")
    lm = DiffutronLM.create_from_arg_string(f"pretrained={tiny_checkpoint},mc_num=64", {"batch_size": "auto",
                                                                                       "device": "cpu"})
    assert lm.batch_size == 32  # "auto": the estimator's default
    lm = DiffutronLM.create_from_arg_string(f"pretrained={tiny_checkpoint},mc_num=16", {"batch_size": "8",
                                                                                       "device": "cpu"})
    assert lm.batch_size == 8  # lm-eval's --batch_size (a string on its CLI) when --model_args has none
    # what lm-eval adds to every model's arguments (--trust_remote_code) is accepted
    assert DiffutronLM.create_from_arg_string(f"pretrained={tiny_checkpoint},mc_num=8,batch_size=4,"
                                              "trust_remote_code=True", {"device": "cpu"}).mc_num == 8


@pytest.mark.needs("lm_eval")
def test_cli_unknown_model_arg_is_one_line_exit_2(tiny_checkpoint):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "diffutron_engine", "eval", "lm-eval", "--model_args",
                        f"pretrained={tiny_checkpoint},mc_nmu=8", "--tasks", "diffutron_tr_mc",
                        "--include_path", TASKS], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "error: unknown model argument(s) for diffutron: 'mc_nmu' (did you mean 'mc_num'?)" in r.stderr


@pytest.mark.needs("lm_eval")
def test_end_to_end_through_lm_eval_evaluator(tiny_checkpoint, tmp_path, monkeypatch):
    """lm-eval's own evaluator on the shipped tasks: a multiple-choice task (acc) and a generation task
    (exact match), offline; the numbers are the model's own (a random model: chance level)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from diffutron_engine.integrations.lm_eval import DiffutronLM

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    lm = DiffutronLM(pretrained=tiny_checkpoint, mc_num=8, batch_size=4, device="cpu", max_new_tokens=8, steps=8,
                     block_size=8, is_check_greedy=True)
    out = lm_eval.simple_evaluate(model=lm, tasks=["diffutron_tr_mc", "diffutron_tr_gen"],
                                  task_manager=TaskManager(include_path=TASKS, include_defaults=False), random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0, log_samples=True)
    mcq, gen = out["results"]["diffutron_tr_mc"], out["results"]["diffutron_tr_gen"]
    assert 0.0 <= mcq["acc,none"] <= 1.0 and 0.0 <= gen["exact_match,none"] <= 1.0
    samples = out["samples"]["diffutron_tr_mc"]
    assert len(samples) == 6 and all(len(s["resps"]) == 4 for s in samples)
    # acc is lm-eval's own reduction of our numbers: the share of questions whose gold choice scores best
    best = [max(range(4), key=lambda j: float(s["resps"][j][0][0])) == s["target"] for s in samples]
    assert mcq["acc,none"] == pytest.approx(sum(best) / len(best))
    # the greedy flags lm-eval logged are the model's own check (deterministic: no random draw)
    for s in samples[:2]:
        pairs = [mc.encode_pair(lm.tokenizer, a["arg_0"], a["arg_1"]) for a in s["arguments"].values()] \
            if isinstance(s["arguments"], dict) else [mc.encode_pair(lm.tokenizer, *a) for a in s["arguments"]]
        assert [str(g) for g in lm._greedy(pairs)] == [str(r[0][1]) for r in s["resps"]]


@pytest.mark.slow
@pytest.mark.needs("lm_eval")
def test_end_to_end_through_the_cli(tiny_checkpoint, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "ds"))
    r = subprocess.run([sys.executable, "-m", "diffutron_engine", "eval", "lm-eval", "--model_args",
                        f"pretrained={tiny_checkpoint},mc_num=8,batch_size=4,max_new_tokens=8,steps=8,block_size=8",
                        "--tasks", "diffutron_tr_mc,diffutron_tr_gen", "--include_path", TASKS,
                        "--output_path", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "diffutron_tr_mc" in r.stdout and "acc" in r.stdout and "exact_match" in r.stdout
    results = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.startswith("results")]
    report = json.load(open(results[0]))
    assert report["config"]["batch_size"] in (4, "4")  # the estimator's batch size, not lm-eval's default 1
    assert report["results"]["diffutron_tr_mc"]["alias"] == "diffutron_tr_mc"


def test_bench_eval_small_run_reports_identical_numbers():
    from diffutron_engine.bench.likelihood import format_table, run

    report = run(layers=1, requests=4, mc_num=8, batch_size=4, vocab=1024, seed=1, log=lambda m: None)
    assert report["max_rel_diff"] <= 1e-4
    assert [r["name"] for r in report["results"]] == ["plain", "batched"]
    assert report["results"][0]["forwards"] == 4 * 2 and report["results"][1]["forwards"] == 1
    assert report["speedup"] > 0 and "speed-up" in format_table(report)
    json.dumps(report)


# ------------------------------------------------------------------------------------ noise per request
def test_per_request_noise_does_not_depend_on_order_or_split(tiny):
    """seed given: each request's noise comes from (seed, its tokens), so its number is the same in any
    order, alone or with others, whatever torch's generator holds (up to float rounding of the forwards,
    whose rows are packed differently)."""
    pairs = [mc.encode_pair(tiny.tokenizer, c, x) for c, x in PAIRS_TEXT]
    runner, mask, pad = ModernBert(tiny.model), tiny.tokenizer.mask_token_id, tiny.tokenizer.pad_token_id

    def score(ps, torch_seed):
        torch.manual_seed(torch_seed)
        return mc.loglikelihood_batched(runner, ps, mask, pad, 8, 4, token_budget=64, seed=7)

    whole = score(pairs, 0)
    order = [3, 0, 4, 2, 1]
    shuffled = score([pairs[i] for i in order], 1)
    split = score(pairs[:2], 2) + score(pairs[2:], 3)
    assert _rel(whole, [shuffled[order.index(i)] for i in range(len(pairs))]) <= 1e-6
    assert _rel(whole, split) <= 1e-6
    for i, p in enumerate(pairs):  # one at a time: the same noise (a request's own generator)
        assert _rel([whole[i]], score([p], 100 + i)) <= 1e-6
    # the noise really is the request's draw: the plain implementation from the same seeds agrees
    assert _rel(whole, mc.loglikelihood_plain(tiny.model, pairs, mask, 8, 4, seed=7)) <= 1e-4
    assert score(pairs, 0) == whole  # same packing: bit for bit
    assert mc.loglikelihood_batched(runner, pairs, mask, pad, 8, 4, token_budget=64, seed=8) != whole


def test_request_seed_is_a_function_of_seed_and_tokens():
    a, b = mc.Scored([5, 6], [7]), mc.Scored([5], [6, 7])
    assert mc.request_seed(0, a) == mc.request_seed(0, mc.Scored([5, 6], [7]))
    assert len({mc.request_seed(0, a), mc.request_seed(0, b), mc.request_seed(1, a)}) == 3  # the split counts
    assert 0 <= mc.request_seed(2**62, a) < 2**63


@pytest.mark.needs("lm_eval")
def test_lm_default_noise_is_per_request_and_stream_mode_is_the_harnesss(tiny_checkpoint, tiny):
    """Default (seed_per_request): a request's number depends on the model's seed and the request, not on
    torch's generator or the others; seed_per_request=false: torch's stream in request order, the numbers
    of the one-request-at-a-time harness for the same torch seed and order."""
    from diffutron_engine.integrations.lm_eval import DiffutronLM

    pairs = [mc.encode_pair(tiny.tokenizer, c, x) for c, x in PAIRS_TEXT]
    reqs = [_Req(c, x) for c, x in PAIRS_TEXT]
    mask = tiny.tokenizer.mask_token_id
    per = DiffutronLM(pretrained=tiny_checkpoint, mc_num=8, batch_size=4, device="cpu", dtype="float32", seed=3)
    torch.manual_seed(0)
    got = [ll for ll, _ in per.loglikelihood(reqs)]
    torch.manual_seed(1)
    backwards = [ll for ll, _ in per.loglikelihood(reqs[::-1])][::-1]
    assert _rel(got, backwards) <= 1e-6
    assert _rel(got, mc.loglikelihood_plain(tiny.model, pairs, mask, 8, 4, seed=3)) <= 1e-4
    stream = DiffutronLM(pretrained=tiny_checkpoint, mc_num=8, batch_size=4, device="cpu", dtype="float32",
                         seed_per_request="false")
    torch.manual_seed(4)
    got = [ll for ll, _ in stream.loglikelihood(reqs)]
    torch.manual_seed(4)
    assert _rel(got, mc.loglikelihood_plain(tiny.model, pairs, mask, 8, 4)) <= 1e-4


@pytest.mark.needs("lm_eval")
def test_sampled_generation_seeds_follow_the_request_not_its_place(lm):
    """seed_per_request: a sampled request's seed is a function of (seed, its context and arguments,
    which repeat of the request object it is): the same in any order; repeats differ."""
    a = _Req("Hava bugün", {"max_gen_toks": 4, "do_sample": True})
    b = _Req("Bir dil modeli", {"max_gen_toks": 4, "do_sample": True})
    seeds = [lm._generation_seed(r, i, seen := {}) for i, r in enumerate([a, b])]
    seen = {}
    assert [lm._generation_seed(r, i, seen) for i, r in enumerate([b, a])] == seeds[::-1]
    seen = {}
    first, second = lm._generation_seed(a, 0, seen), lm._generation_seed(a, 1, seen)
    assert first == seeds[0] and second != first


# --------------------------------------------------------------------------------------- data parallel
@pytest.mark.slow
@pytest.mark.needs("lm_eval")
def test_two_processes_score_what_one_does(tiny_checkpoint, tmp_path):
    """torchrun with 2 CPU processes (gloo): each scores its share of the offline tasks, and lm-eval's
    logged samples and aggregates on rank 0 are those of one process (same seed)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_dp_run.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "ds"),
               OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = subprocess.run([sys.executable, script, tiny_checkpoint, TASKS, str(one)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        script, tiny_checkpoint, TASKS, str(two)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["results"] == b["results"]  # the aggregates
    # each process scored its share: the two shares are the whole (lm-eval pads a shorter share with a
    # repeat of its last request, so a share may hold one request more)
    alone = json.loads(open(f"{one}.rank0").read())
    shares = [json.loads(open(f"{two}.rank{k}").read()) for k in (0, 1)]
    for kind, n in alone.items():
        assert all(0 < s[kind] < n for s in shares) and n <= shares[0][kind] + shares[1][kind] <= n + 2
    for task, rows in a["samples"].items():
        other = b["samples"][task]
        assert [s["doc_id"] for s in rows] == [s["doc_id"] for s in other]
        for x, y in zip(rows, other):
            assert x["filtered_resps"] == y["filtered_resps"] or _close(x["filtered_resps"], y["filtered_resps"])
            # the first response of each request (a padded repeat adds a second on its rank)
            assert _close([r[0] for r in x["resps"]], [r[0] for r in y["resps"]])
            assert {k: v for k, v in x.items() if k not in ("resps", "filtered_resps")} == \
                   {k: v for k, v in y.items() if k not in ("resps", "filtered_resps")}


def _close(x, y) -> bool:
    """Equal, numbers within 1e-6 relative (the forwards are packed differently across processes)."""
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y))
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= 1e-6 * max(abs(x), abs(y), 1e-12)
    return x == y


# ------------------------------------------------------------------------------------------- progress
@pytest.mark.needs("lm_eval")
def test_progress_bars_per_phase_and_quiet_when_asked(lm, capfd, monkeypatch):
    """One bar per phase on stderr (likelihood copies, generation requests), with an ETA; none with
    disable_tqdm or lm-eval's log level at WARNING/ERROR."""
    import logging

    reqs = [_Req(c, x) for c, x in PAIRS_TEXT[:2]]
    gen = [_Req("Hava bugün", {"max_gen_toks": 4})]
    monkeypatch.delenv("LMEVAL_LOG_LEVEL", raising=False)
    monkeypatch.setattr(logging.getLogger("lm_eval"), "level", logging.INFO)
    capfd.readouterr()
    lm.loglikelihood(reqs)
    lm.generate_until(gen)
    out, err = capfd.readouterr()
    assert not out
    assert "diffutron likelihood (copies)" in err and "16/16" in err  # 2 requests x mc_num 8
    assert "diffutron generation (requests)" in err and "1/1" in err and "<" in err  # elapsed<remaining
    lm.loglikelihood(reqs, disable_tqdm=True)
    lm.generate_until(gen, disable_tqdm=True)
    assert "diffutron" not in capfd.readouterr().err
    for quiet in ("WARNING", "ERROR"):
        monkeypatch.setattr(logging.getLogger("lm_eval"), "level", logging.getLevelName(quiet))
        lm.loglikelihood(reqs)
        assert "diffutron" not in capfd.readouterr().err
    monkeypatch.setattr(logging.getLogger("lm_eval"), "level", logging.INFO)
    monkeypatch.setenv("LMEVAL_LOG_LEVEL", "ERROR")  # what `eval lm-eval --verbosity ERROR` sets
    lm.generate_until(gen)
    assert "diffutron" not in capfd.readouterr().err


# ----------------------------------------------------------------------------------------------- peft
@pytest.fixture(scope="module")
def adapter_and_merged(tiny_checkpoint, tmp_path_factory):
    """A LoRA adapter on the tiny checkpoint (random, non-zero B: it changes the model) and the
    checkpoint `train merge` makes of it."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForMaskedLM

    from diffutron_engine.training.merge import merge_lora

    out = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base = AutoModelForMaskedLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["Wqkv", "Wo", "Wi"],
                                            init_lora_weights=False))
    adapter = str(out / "adapter")
    model.save_pretrained(adapter)
    return adapter, merge_lora(adapter, str(out / "merged"))


@pytest.mark.needs("lm_eval", "peft")
def test_peft_adapter_scores_what_its_merged_checkpoint_scores(tiny_checkpoint, adapter_and_merged):
    from diffutron_engine.integrations.lm_eval import DiffutronLM

    adapter, merged = adapter_and_merged
    kw = dict(mc_num=8, batch_size=4, device="cpu", dtype="float32", max_new_tokens=8, steps=8, block_size=8)
    reqs = [_Req(c, x) for c, x in PAIRS_TEXT]
    gen = [_Req("Soru: Türkiye'nin başkenti neresidir?\nCevap:", {"until": ["\n"], "max_gen_toks": 6})]
    with_adapter = DiffutronLM(pretrained=tiny_checkpoint, peft=adapter, **kw)
    want = DiffutronLM(pretrained=merged, **kw)
    base = DiffutronLM(pretrained=tiny_checkpoint, **kw)
    got = with_adapter.loglikelihood(reqs)
    assert got == want.loglikelihood(reqs)  # bit for bit: the same float32 weights
    assert got != base.loglikelihood(reqs)  # and the adapter is applied
    assert with_adapter.generate_until(gen) == want.generate_until(gen)
    with pytest.raises(DiffutronError, match="does not exist"):
        DiffutronLM(pretrained=tiny_checkpoint, peft=str(os.path.dirname(adapter) + "/missing"), **kw)
