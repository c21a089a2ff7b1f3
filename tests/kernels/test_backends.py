"""Backend selection (backends.Ops, the one chooser: forced backends, describe(), and no backend
function named outside it), and the C++ sampler's greedy path on hard rows against the torch chain."""

import ast
import os
import re
from pathlib import Path

import pytest
import torch

from diffutron_engine import DiffutronError, backends
from diffutron_engine.backends import OPS, BackendUnavailable, Ops, force_backend, sample
from diffutron_engine.kernels.sampling import SamplingTensors, sample_cpp

# the GPU tier: bench/gpu_suite runs this file on the GPU machine
pytestmark = pytest.mark.gpu_suite

EPS32 = torch.finfo(torch.float32).eps


def _cases():
    g = torch.Generator().manual_seed(0)
    yield "odd sizes", torch.randn(7, 4097, generator=g) * 4  # V not a multiple of the C++ 4096 tile
    yield "one column", torch.randn(3, 1, generator=g)
    yield "wide", torch.randn(5, 256_000 // 16 + 3, generator=g) * 8
    x = torch.randn(4, 5000, generator=g)
    x[0, :4096] = -torch.inf  # a whole first tile of -inf
    x[1, 100:] = -torch.inf
    x[2, 17] = 50.0  # a dominant token: confidence near 1
    yield "infinities", x
    yield "strided rows", torch.randn(6, 9000, generator=g)[:, :8191]
    yield "transposed view", torch.randn(3000, 5, generator=g).T  # the CPU LM head's [V, N] storage
    ties = torch.zeros(2, 300)
    ties[:, [5, 250]] = 3.0
    yield "ties", ties


@pytest.mark.cext
@pytest.mark.parametrize("name,logits", list(_cases()), ids=[c[0] for c in _cases()])
def test_cpp_greedy_matches_the_torch_chain(name, logits):
    ids, conf = sample_cpp(logits, SamplingTensors())
    ref_ids = logits.argmax(-1)
    assert torch.equal(ids, ref_ids)  # same token, same tie rule (first maximum)
    ref64 = torch.softmax(logits.double(), -1).gather(-1, ref_ids[:, None]).squeeze(-1)
    conf32 = torch.softmax(logits, -1).gather(-1, ref_ids[:, None]).squeeze(-1)
    # flash-attention rule: at most about twice the error of torch's own float32 chain
    err = (conf.double() - ref64).abs().max().item()
    err_torch = (conf32.double() - ref64).abs().max().item()
    assert err <= 2 * max(err_torch, EPS32), (err, err_torch)


@pytest.mark.cext
def test_cpp_all_minus_inf_row_gives_nan_like_torch():
    logits = torch.full((2, 10), -torch.inf)
    logits[1, 3] = 0.0
    ids, conf = sample_cpp(logits, SamplingTensors())
    assert torch.isnan(conf[0]) and torch.isnan(torch.softmax(logits[0], -1)[0])
    assert ids[1] == 3 and conf[1] == 1.0


def test_forced_backend_is_used_and_checked(monkeypatch):
    logits = torch.randn(3, 50)
    with force_backend("torch"):
        assert backends.pick(torch.device("cpu"), {"cpp": True, "torch": True}) == "torch"
        ids, _ = sample(logits, SamplingTensors())
    assert torch.equal(ids, logits.argmax(-1))
    with force_backend("triton"), pytest.raises(RuntimeError, match="forced but is not available"):
        backends.pick(torch.device("cpu"), {"cpp": True, "torch": True})
    with force_backend("cpp"):  # an op without a C++ kernel runs its torch version
        assert backends.pick(torch.device("cpu"), {"triton": False, "torch": True}) == "torch"
    monkeypatch.setenv("DIFFUTRON_BACKEND", "torch")
    assert backends.pick(torch.device("cpu"), {"cpp": True, "torch": True}) == "torch"
    monkeypatch.setenv("DIFFUTRON_BACKEND", "cuda-magic")
    with pytest.raises(DiffutronError, match="not one of"):
        backends.pick(torch.device("cpu"), {"torch": True})
    monkeypatch.setenv("DIFFUTRON_BACKEND", "TORCH")
    with pytest.raises(DiffutronError, match="names are lower case: 'torch'"):
        backends.pick(torch.device("cpu"), {"torch": True})
    # `env` shows an invalid setting instead of failing
    assert backends.describe()["forced backend"].startswith("invalid: DIFFUTRON_BACKEND='TORCH'")
    monkeypatch.setenv("DIFFUTRON_BACKEND", "triton")
    with pytest.raises(DiffutronError, match="DIFFUTRON_BACKEND=triton was forced but is not available for this op on cpu"):
        backends.pick(torch.device("cpu"), {"triton": False, "torch": True})


def test_automatic_choice():
    assert backends.pick(torch.device("cpu"), {"cpp": True, "torch": True}) == "cpp"
    assert backends.pick(torch.device("cpu"), {"cpp": False, "torch": True}) == "torch"
    assert backends.pick(torch.device("cuda"), {"triton": True, "cpp": True, "torch": True}) == "triton"
    # bfloat16 logits are not the C++ kernel's input: torch handles them
    ids, _ = sample(torch.randn(2, 30).bfloat16(), SamplingTensors())
    assert ids.shape == (2,)


# ------------------------------------------------------------------------------------------ Ops
CPU = torch.device("cpu")


def _fields(ops: Ops) -> tuple:
    return (ops.sample_backend, ops.head_backend, ops.unmask_backend, ops.attention_backend,
            ops.cross_entropy_backend)


def test_ops_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("DIFFUTRON_BACKEND", raising=False)
    cpp = "cpp" if backends.cpp_available() else "torch"
    # CPU: C++ for the float32 sampler, torch for the rest; the fused head needs the Triton sampler
    assert _fields(Ops.select(CPU, torch.float32)) == (cpp, None, "torch", "torch", "torch")
    assert _fields(Ops.select("cpu", torch.bfloat16)) == ("torch", None, "torch", "torch", "torch")
    assert not Ops.select(CPU, torch.float32).fused_head


def test_ops_forced_backends(monkeypatch):
    monkeypatch.delenv("DIFFUTRON_BACKEND", raising=False)
    with force_backend("torch"):
        assert _fields(Ops.select(CPU, torch.float32)) == ("torch", None, "torch", "torch", "torch")
    if backends.cpp_available():
        with force_backend("cpp"):  # the ops without a C++ version run torch
            assert _fields(Ops.select(CPU, torch.float32)) == ("cpp", None, "torch", "torch", "torch")
    with force_backend("cpp"), pytest.raises(BackendUnavailable, match="forced but is not available"):
        Ops.select(CPU, torch.bfloat16)  # the C++ sampler reads float32 logits only
    with force_backend("cpp"):  # ... which a caller that only trains never runs
        assert _fields(Ops.select(CPU, torch.bfloat16, only=("cross_entropy",))) == (None,) * 4 + ("torch",)
    monkeypatch.setenv("DIFFUTRON_BACKEND", "torch")
    assert _fields(Ops.select(CPU, torch.float32)) == ("torch", None, "torch", "torch", "torch")


@pytest.mark.triton
def test_ops_forced_triton(monkeypatch):
    monkeypatch.delenv("DIFFUTRON_BACKEND", raising=False)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
    else:  # CPU tensors run Triton in the interpreter only
        dev = CPU
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with force_backend("triton"):
        ops = Ops.select(dev, torch.float32)  # forced: attention takes the kernel in float32 too
    assert _fields(ops) == ("triton",) * 5 and ops.fused_head
    if dev == CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        for only in [(op,) for op in OPS]:
            with force_backend("triton"), pytest.raises(BackendUnavailable, match="Triton kernels run on CUDA"):
                Ops.select(CPU, torch.float32, only=only)


def test_ops_chosen_once_a_call_reads_no_environment(monkeypatch):
    """The methods only read the fields: a forced backend set after select changes nothing."""
    monkeypatch.delenv("DIFFUTRON_BACKEND", raising=False)
    with force_backend("torch"):
        ops = Ops.select(CPU, torch.float32)
    monkeypatch.setattr(backends, "pick", lambda *a, **k: pytest.fail("an op call made a choice"))
    monkeypatch.setenv("DIFFUTRON_BACKEND", "no-such-backend")
    logits = torch.randn(3, 50)
    ids, _ = ops.sample(logits, SamplingTensors())
    assert torch.equal(ids, logits.argmax(-1))
    hidden, weight, target = torch.randn(4, 8), torch.randn(20, 8), torch.tensor([1, 2, 3, 4])
    loss = ops.cross_entropy(hidden, weight, target, reduction="mean")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(hidden @ weight.T, target))


def test_ops_attention_dispatch_and_mask():
    from diffutron_engine.kernels.attention import attention_reference

    ops = Ops(attention_backend="torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 16, generator=g) for _ in range(3))
    q_pos = torch.arange(5).expand(2, 5)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    mask = ops.attention_mask(q_pos, valid, 1)
    assert mask.shape == (2, 1, 5, 5)
    out = ops.attention(q, k, v, None, q_pos, valid, 1, 0.25, mask)
    ref = attention_reference(q, k.clone(), v.clone(), torch.arange(2), q_pos, valid, 1, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert Ops(attention_backend="triton").attention_mask(q_pos, valid, 1) is None  # the kernel masks itself


def test_ops_not_selected_raise():
    ops = Ops.select(CPU, torch.float32, only=("attention",))
    assert _fields(ops) == (None, None, None, "torch", None)
    with pytest.raises(BackendUnavailable, match="'sample' has no backend here"):
        ops.sample(torch.randn(2, 5), SamplingTensors())
    with pytest.raises(BackendUnavailable, match="Triton sampler only"):
        Ops.select(CPU, torch.float32).sample_head(torch.randn(2, 4), torch.randn(5, 4), None, SamplingTensors())
    with pytest.raises(BackendUnavailable, match="'cross_entropy' has no backend"):
        ops.cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown ops"):
        Ops.select(CPU, torch.float32, only=("sampler",))


def test_describe_names_every_op(monkeypatch):
    monkeypatch.delenv("DIFFUTRON_BACKEND", raising=False)
    out = backends.describe()
    for key in ("sampler on cpu", "fused head on cpu", "unmask on cpu", "attention on cpu (float32)",
                "cross-entropy on cpu"):
        assert key in out, key
    assert out["cross-entropy on cpu"] == "torch" and out["fused head on cpu"].startswith("no")
    with force_backend("torch"):
        assert backends.describe()["sampler on cpu"] == "torch"
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with force_backend("triton"):  # a forced backend this device cannot run: shown, not raised
            assert "forced but is not available" in backends.describe()["ops on cpu"]


# ------------------------------------------------------------------------------------------ one chooser
ROOT = Path(__file__).resolve().parents[2]
# the package's source: diffutron_engine/, and kernels/ and training/ (installed as its subpackages)
PACKAGE_DIRS = ("diffutron_engine", "kernels", "training")
BACKEND_SUFFIX = re.compile(r"_(triton|cpp|torch)$")


def _backend_functions() -> dict[str, str]:
    """Every backend implementation the kernel modules define (a function named *_triton, *_cpp or
    *_torch), by name -> its module."""
    out = {}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and BACKEND_SUFFIX.search(node.name):
                out[node.name] = path.stem
    return out


def _named(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every name, attribute and imported name in a module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, ast.alias):
            out.append((node.lineno, node.name.rsplit(".", 1)[-1]))
    return out


def _violations(source: str, where: str, module: str | None, functions: dict[str, str]) -> list[str]:
    """Uses of a backend implementation in `source` that are not its own kernel module's."""
    return [f"{where}:{line}: {name}" for line, name in sorted(_named(ast.parse(source, where)))
            if name in functions and functions[name] != module]


def test_no_backend_function_is_named_outside_backends_py():
    """Only backends.py (the chooser) and each kernel's own module name a backend implementation: the
    runner, the model, training and the integrations call `Ops` (ops.sample, ops.sample_head, ...)."""
    functions = _backend_functions()
    # the ops every backend of the project has: if these are not found, the scan finds nothing
    assert {"sample_triton", "sample_head_triton", "sample_cpp", "sample_torch", "unmask_triton",
            "unmask_torch", "attention_triton", "attention_torch", "linear_cross_entropy_triton",
            "linear_cross_entropy_torch"} <= set(functions)
    found = []
    for top in PACKAGE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "diffutron_engine/backends.py":
                continue
            module = path.stem if top == "kernels" and path.parent == ROOT / "kernels" else None
            found += _violations(path.read_text(), rel, module, functions)
    assert not found, "backend implementations named outside backends.py (call them through Ops):\n" + \
        "\n".join(found)


def test_the_scan_finds_direct_calls_and_imports():
    functions = _backend_functions()
    bad = ("from ..kernels.sampling import sample_head_triton\n"
           "import diffutron_engine.kernels.unmask as um\n"
           "x = um.unmask_torch(1)\n"
           "y = sample_head_triton(2)\n")
    assert _violations(bad, "runner.py", None, functions) == [
        "runner.py:1: sample_head_triton", "runner.py:3: unmask_torch", "runner.py:4: sample_head_triton"]
    # a kernel module names its own implementations
    own = "def sample_torch(x):\n    return x\nsample_torch(1)\n"
    assert _violations(own, "kernels/sampling.py", "sampling", functions) == []
    assert os.path.isfile(ROOT / "diffutron_engine" / "backends.py")
