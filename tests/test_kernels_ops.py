"""Correctness of the Triton kernels of c2i_fast.kernels against the pure-torch references and float64.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1) on CPU tensors (fp32/fp16;
bf16 is broken there). With CUDA the same tests launch the compiled kernels on the GPU (and add bf16).
Every launch allocates its outputs NaN-filled (C2I_KERNELS_POISON=1) so a row a kernel never writes fails.

Tolerances (relative Frobenius error vs. a float64 ground truth computed from the same rounded inputs):
fp32 1e-5, fp16 1e-3, bf16 8e-3. Shapes stay small: the interpreter runs one Python call per program.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (see kernels/utils.launchable)

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from helpers import KERNELS_IMPORT, assert_close, load_kernels  # noqa: E402

K = load_kernels()   # c2i_fast.kernels, installed or straight from the source tree
naive = K.naive
lowrank_mod = sys.modules[K.__name__ + ".lowrank"]
clustered_mod = sys.modules[K.__name__ + ".clustered"]
reconstruct_mod = sys.modules[K.__name__ + ".reconstruct"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
needs_triton = pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("C2I_KERNELS", "triton")
    monkeypatch.setenv("C2I_KERNELS_POISON", "1")


def rnd(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------------------- lowrank

LOWRANK_SHAPES = [  # (lead shape of x, n, m, r, with s, with bias)
    ((1,), 63, 50, 1, True, True),          # decode, rank 1
    ((16,), 500, 63, 7, False, True),       # decode, long K (split-K)
    ((63,), 64, 500, 64, True, False),      # full rank r = min(m, n)
    ((100,), 63, 130, 63, True, True),      # prefill tiles, full rank, odd everything
    ((2, 5), 40, 24, 3, True, True),        # 3-D input
    ((0,), 10, 12, 3, True, True),          # no tokens
    ((4,), 16, 9, 0, False, True),          # rank 0 -> bias only
]


@needs_triton
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=lambda s: "x{}-n{}-m{}-r{}".format(*s[:4]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["auto", "tiled", "splitk3", "lowp", "split", "fp32"])
def test_lowrank_matmul_triton(triton_backend, shape, dtype, path):
    lead, n, m, r, with_s, with_b = shape
    g = torch.Generator().manual_seed(1)
    x = rnd(*lead, n, dtype=dtype, gen=g)
    u, v = rnd(m, r, dtype=dtype, gen=g, scale=0.3), rnd(n, r, dtype=dtype, gen=g, scale=0.3)
    s = (torch.rand(r, generator=g) + 0.5).to(DEVICE) if with_s else None
    b = rnd(m, gen=g) if with_b else None
    kw = {"auto": {}, "tiled": {"split_k": 1}, "splitk3": {"split_k": 3},
          "lowp": {"split_k": 1, "t_mode": "lowp"}, "split": {"split_k": 1, "t_mode": "split"},
          "fp32": {"t_mode": "fp32"}}[path]
    y = lowrank_mod.lowrank_matmul_triton(x, u, v, s, b, **kw)
    assert y.dtype == dtype and y.shape == (*lead, m)
    truth = x.double() @ v.double()
    truth = (truth * s.double() if s is not None else truth) @ u.double().T
    truth = truth + b.double() if b is not None else truth
    ref = naive.lowrank_matmul(x, u, v, s, b)
    assert_close(y, truth, TOL[dtype], name="triton")
    assert_close(ref, truth, TOL[dtype], name="reference")


@needs_triton
def test_lowrank_dispatcher_uses_triton_when_forced(triton_backend, monkeypatch):
    calls = []
    real = lowrank_mod.lowrank_matmul_triton
    monkeypatch.setattr(lowrank_mod, "lowrank_matmul_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, u, v = rnd(3, 20), rnd(30, 4), rnd(20, 4)
    y = K.lowrank_matmul(x, u, v)
    assert calls
    assert_close(y, x.double() @ v.double() @ u.double().T, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lowrank_backward(monkeypatch, backend):
    if backend == "triton" and not K.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("C2I_KERNELS", backend)
    g = torch.Generator().manual_seed(2)
    x, u, v = rnd(2, 7, 33, gen=g), rnd(21, 5, gen=g), rnd(33, 5, gen=g)
    s, b = (torch.rand(5, generator=g) + 0.5).to(DEVICE), rnd(21, gen=g)
    gy = rnd(2, 7, 21, gen=g)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, s, b)]
    (K.lowrank_matmul(*leaves) * gy).sum().backward()
    leaves64 = [t.double().clone().requires_grad_() for t in (x, u, v, s, b)]
    xd, ud, vd, sd, bd = leaves64
    (((xd @ vd) * sd @ ud.T + bd) * gy.double()).sum().backward()
    for got, want, name in zip(leaves, leaves64, ["x", "u", "v", "s", "bias"]):
        assert_close(got.grad, want.grad, 1e-5, name=name)
    # without s/bias, only some inputs needing grad
    x1, u1 = x.clone().requires_grad_(), u.clone()
    K.lowrank_matmul(x1, u1, v).sum().backward()
    assert_close(x1.grad, torch.ones(2, 7, 21, device=DEVICE).double() @ u.double() @ v.double().T, 1e-5)


# ----------------------------------------------------------------------------------------------- clustered

def make_clusters(m, n, sizes, ranks, dtype, gen):
    """Random row assignment with the given cluster sizes/ranks -> (v_cat, u_packed, row_index, row_offsets,
    rank_offsets) in the conventions of kernels/naive.py, plus the float64 dense Ŵ built independently."""
    assert sum(sizes) == m and len(sizes) == len(ranks)
    row_index = torch.randperm(m, generator=gen)
    row_offsets = torch.tensor([0] + sizes).cumsum(0)
    rank_offsets = torch.tensor([0] + ranks).cumsum(0)
    r_max = max(1, max(ranks))
    v_cat = torch.randn(n, int(rank_offsets[-1]), generator=gen) * 0.3
    u_packed = torch.zeros(m, r_max)
    w = torch.zeros(m, n, dtype=torch.float64)
    for c, (h, r) in enumerate(zip(sizes, ranks)):
        r0, k0 = int(row_offsets[c]), int(rank_offsets[c])
        u_packed[r0:r0 + h, :r] = torch.randn(h, r, generator=gen) * 0.3
    v_cat, u_packed = v_cat.to(dtype), u_packed.to(dtype)
    for c, (h, r) in enumerate(zip(sizes, ranks)):
        r0, k0 = int(row_offsets[c]), int(rank_offsets[c])
        w[row_index[r0:r0 + h]] = u_packed[r0:r0 + h, :r].double() @ v_cat[:, k0:k0 + r].double().T
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    return dev(v_cat), dev(u_packed), dev(row_index), dev(row_offsets), dev(rank_offsets), w


CLUSTER_CASES = {  # name: (m, n, sizes, ranks)
    "k1-full-rank": (40, 24, [40], [24]),
    "k4-empty-single-rank0": (63, 50, [20, 0, 1, 42], [5, 3, 1, 0]),
    "k8-odd": (130, 63, [17, 16, 16, 16, 16, 16, 16, 17], [1, 2, 3, 4, 5, 6, 7, 63]),
    "k2-rank1": (500, 16, [250, 250], [1, 1]),
    "k3-all-rank0": (20, 10, [5, 5, 10], [0, 0, 0]),
}


@needs_triton
@pytest.mark.parametrize("case", list(CLUSTER_CASES), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [(1,), (70,), (2, 9)], ids=["M1", "M70", "M2x9"])
def test_clustered_lowrank_matmul_triton(triton_backend, case, dtype, tokens):
    m, n, sizes, ranks = CLUSTER_CASES[case]
    g = torch.Generator().manual_seed(3)
    v_cat, u_packed, ri, ro, ko, w = make_clusters(m, n, sizes, ranks, dtype, g)
    x = rnd(*tokens, n, dtype=dtype, gen=g)
    for bias in (None, rnd(m, gen=g)):
        y = K.clustered_lowrank_matmul(x, v_cat, u_packed, ri, ro, ko, bias)
        assert y.dtype == dtype and y.shape == (*tokens, m)
        truth = x.double().cpu() @ w.T + (bias.double().cpu() if bias is not None else 0)
        ref = naive.clustered_lowrank_matmul(x, v_cat, u_packed, ri, ro, ko, bias)
        if truth.norm() == 0:   # all rank 0, no bias
            assert not torch.isnan(y).any() and y.abs().max() == 0
            continue
        assert_close(y, truth, TOL[dtype], name="triton")
        assert_close(ref, truth, TOL[dtype], name="reference")


@needs_triton
@pytest.mark.parametrize("path", [{"split_k": 1}, {"split_k": 4}, {"split_k": 1, "t_mode": "lowp"},
                                  {"t_mode": "split"}, {"t_mode": "fp32"}],
                         ids=["tiled", "splitk4", "lowp", "split", "fp32"])
def test_clustered_paths(triton_backend, path):
    m, n, sizes, ranks = CLUSTER_CASES["k8-odd"]
    g = torch.Generator().manual_seed(4)
    v_cat, u_packed, ri, ro, ko, w = make_clusters(m, n, sizes, ranks, torch.float16, g)
    x = rnd(33, n, dtype=torch.float16, gen=g)
    y = clustered_mod.clustered_lowrank_matmul_triton(x, v_cat, u_packed, ri, ro, ko, None, **path)
    assert_close(y, x.double().cpu() @ w.T, TOL[torch.float16])


def test_clustered_properties(monkeypatch):
    """Random metadata (hypothesis): sizes with empty/single-row clusters, ranks from 0 to full."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies
    backend = "triton" if K.HAS_TRITON else "torch"
    monkeypatch.setenv("C2I_KERNELS", backend)
    monkeypatch.setenv("C2I_KERNELS_POISON", "1")

    @hyp.settings(max_examples=12, deadline=None, derandomize=True)
    @hyp.given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
               n=st.integers(1, 40), tokens=st.integers(1, 20), data=st.data())
    def check(sizes, n, tokens, data):
        ranks = [data.draw(st.integers(0, min(h, n) if h else 3)) for h in sizes]
        g = torch.Generator().manual_seed(5)
        v_cat, u_packed, ri, ro, ko, w = make_clusters(sum(sizes), n, sizes, ranks, torch.float32, g)
        x = rnd(tokens, n, gen=g)
        y = K.clustered_lowrank_matmul(x, v_cat, u_packed, ri, ro, ko)
        assert_close(y, x.double().cpu() @ w.T, 1e-5, name="matmul")
        wh = K.clustered_reconstruct(v_cat, u_packed, ri, ro, ko)
        assert_close(wh, w, 1e-5, name="reconstruct")

    check()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clustered_backward(monkeypatch, backend):
    if backend == "triton" and not K.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("C2I_KERNELS", backend)
    m, n, sizes, ranks = CLUSTER_CASES["k4-empty-single-rank0"]
    g = torch.Generator().manual_seed(6)
    v_cat, u_packed, ri, ro, ko, _ = make_clusters(m, n, sizes, ranks, torch.float32, g)
    x, b, gy = rnd(5, n, gen=g), rnd(m, gen=g), rnd(5, m, gen=g)
    leaves = [t.clone().requires_grad_() for t in (x, v_cat, u_packed, b)]
    (K.clustered_lowrank_matmul(leaves[0], leaves[1], leaves[2], ri, ro, ko, leaves[3]) * gy).sum().backward()
    d = [t.double().clone().requires_grad_() for t in (x, v_cat, u_packed, b)]
    (naive.clustered_lowrank_matmul(d[0], d[1], d[2], ri, ro, ko, d[3]) * gy.double()).sum().backward()
    for got, want, name in zip(leaves, d, ["x", "v_cat", "u_packed", "bias"]):
        # u_packed columns >= r_c are padding: the reference's grad there is 0, ours too
        assert_close(got.grad, want.grad, 1e-5, name=name)


# --------------------------------------------------------------------------------------------- reconstruct

@needs_triton
@pytest.mark.parametrize("case", list(CLUSTER_CASES), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [None, 3], ids=["single", "batch3"])
def test_clustered_reconstruct_triton(triton_backend, case, dtype, batch):
    m, n, sizes, ranks = CLUSTER_CASES[case]
    g = torch.Generator().manual_seed(7)
    mats = [make_clusters(m, n, sizes, ranks, dtype, g) for _ in range(batch or 1)]
    ro, ko = mats[0][3], mats[0][4]
    if batch is None:
        v_cat, u_packed, ri, _, _, w = mats[0]
    else:
        v_cat = torch.stack([t[0] for t in mats])
        u_packed = torch.stack([t[1] for t in mats])
        ri = torch.stack([t[2] for t in mats])
        w = torch.stack([t[5] for t in mats])
    out = K.clustered_reconstruct(v_cat, u_packed, ri, ro, ko)
    assert out.dtype == dtype and out.shape == w.shape
    ref = naive.clustered_reconstruct(v_cat, u_packed, ri, ro, ko)
    if w.norm() == 0:
        assert not torch.isnan(out).any() and out.abs().max() == 0
        return
    assert_close(out, w, TOL[dtype], name="triton")
    assert_close(ref, w, TOL[dtype], name="reference")
    if batch is not None:  # a 1-D row_index is shared by the whole batch
        shared = K.clustered_reconstruct(v_cat, u_packed, ri[0], ro, ko)
        want = naive.clustered_reconstruct(v_cat, u_packed, ri[0], ro, ko)
        assert_close(shared, want, TOL[dtype], name="shared row_index")


@pytest.mark.parametrize("batched", [False, True])
def test_clustered_reconstruct_backward(monkeypatch, batched):
    monkeypatch.setenv("C2I_KERNELS", "torch")
    m, n, sizes, ranks = CLUSTER_CASES["k4-empty-single-rank0"]
    g = torch.Generator().manual_seed(8)
    v_cat, u_packed, ri, ro, ko, _ = make_clusters(m, n, sizes, ranks, torch.float32, g)
    if batched:
        v_cat, u_packed, ri = v_cat.expand(2, -1, -1), u_packed.expand(2, -1, -1), ri.expand(2, -1)
    gw = rnd(*((2,) if batched else ()), m, n, gen=g)
    a, b = v_cat.clone().requires_grad_(), u_packed.clone().requires_grad_()
    (K.clustered_reconstruct(a, b, ri, ro, ko) * gw).sum().backward()
    ad, bd = v_cat.double().clone().requires_grad_(), u_packed.double().clone().requires_grad_()
    (naive.clustered_reconstruct(ad, bd, ri, ro, ko) * gw.double()).sum().backward()
    assert_close(a.grad, ad.grad, 1e-5, name="v_cat")
    assert_close(b.grad, bd.grad, 1e-5, name="u_packed")


# ------------------------------------------------------------------------------------------ dispatch etc.

def test_dispatch_defaults_to_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("C2I_KERNELS", raising=False)
    cpu = torch.zeros(1)
    assert K.backend() == "auto" and not K.use_triton(cpu)
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("Triton path taken"))  # noqa: E731
    monkeypatch.setattr(lowrank_mod, "lowrank_matmul_triton", boom)
    monkeypatch.setattr(clustered_mod, "clustered_lowrank_matmul_triton", boom)
    monkeypatch.setattr(reconstruct_mod, "clustered_reconstruct_triton", boom)
    x, u, v = torch.randn(2, 6), torch.randn(4, 3), torch.randn(6, 3)
    assert torch.allclose(K.lowrank_matmul(x, u, v), x @ v @ u.T, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    v_cat, u_packed, ri, ro, ko, w = [t.cpu() for t in make_clusters(8, 6, [3, 5], [2, 1], torch.float32, g)]
    assert torch.allclose(K.clustered_lowrank_matmul(x, v_cat, u_packed, ri, ro, ko), (x.double() @ w.T).float(),
                          atol=1e-5)
    assert torch.allclose(K.clustered_reconstruct(v_cat, u_packed, ri, ro, ko), w.float(), atol=1e-6)
    monkeypatch.setenv("C2I_KERNELS", "torch")
    assert not K.use_triton(cpu)
    monkeypatch.setenv("C2I_KERNELS", "bogus")
    with pytest.raises(ValueError):
        K.use_triton(cpu)
    if K.HAS_TRITON:
        monkeypatch.setenv("C2I_KERNELS", "triton")
        if os.environ.get("TRITON_INTERPRET") == "1":
            assert K.use_triton(cpu)
            with pytest.raises(AssertionError, match="Triton path taken"):
                K.lowrank_matmul(x, u, v)
        else:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                K.use_triton(cpu)


@needs_triton
def test_interpreter_problem_gives_one_clear_error(monkeypatch):
    """Where triton's interpreter cannot run loops (triton 3.6 with numpy ≥ 2.4) a launch under
    TRITON_INTERPRET=1 raises InterpreterUnavailable naming the versions, not an error from deep inside triton."""
    utils = sys.modules[K.__name__ + ".utils"]
    problem = utils.interpreter_problem()          # the real probe, on this machine's triton and numpy
    import numpy
    import triton
    fixed = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9)
    if fixed or tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4):
        assert problem is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(utils, "interpreter_problem", lambda: "triton 9.9's interpreter cannot run loops here")
    with pytest.raises(utils.InterpreterUnavailable, match="triton 9.9"):
        utils.launchable(lowrank_mod._lowrank_fwd_xv_kernel)


def test_poison_allocates_nan(monkeypatch):
    utils = sys.modules[K.__name__ + ".utils"]
    monkeypatch.setenv("C2I_KERNELS_POISON", "1")
    assert torch.isnan(utils.alloc((2, 3), torch.float16, "cpu")).all()
    monkeypatch.setenv("C2I_KERNELS_POISON", "0")
    assert utils.alloc((2, 3), torch.float16, "cpu").shape == (2, 3)


def test_registered_ops_and_torch_compile(monkeypatch):
    """The ops are registered under torch.ops.c2i, have fake kernels, and a torch.compile'd function that
    calls them (CPU: the reference path behind the opaque op) matches eager, including the backward."""
    monkeypatch.delenv("C2I_KERNELS", raising=False)
    for name in ("lowrank_matmul", "clustered_lowrank_matmul", "clustered_reconstruct", "batched_matmul"):
        assert hasattr(torch.ops.c2i, name)
    x, u, v, s = torch.randn(3, 4, 12), torch.randn(10, 3), torch.randn(12, 3), torch.rand(3)
    torch.library.opcheck(torch.ops.c2i.lowrank_matmul.default, (x[0], u, v, s, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def f(x, u, v, s):
        return torch.relu(K.lowrank_matmul(x, u, v, s)).sum(-1)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=False, backend="aot_eager")
    xr = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    yc, ye = cf(xr, u, v, s), f(xe, u, v, s)
    assert torch.allclose(yc, ye, atol=1e-5)
    yc.sum().backward()
    ye.sum().backward()
    assert torch.allclose(xr.grad, xe.grad, atol=1e-5)
    # no graph break on the op itself
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend="aot_eager")(x, u, v, s)


def test_import_without_triton():
    """c2i_fast.kernels imports and runs the references when triton is not installed."""
    code = KERNELS_IMPORT + """
sys.modules["triton"] = None      # `import triton` now raises ImportError
import torch
K = load_kernels()
assert not K.HAS_TRITON
x, u, v = torch.randn(3, 8), torch.randn(5, 2), torch.randn(8, 2)
assert torch.allclose(K.lowrank_matmul(x, u, v), x @ v @ u.T, atol=1e-5)
U, S, V = K.randomized_svd(torch.randn(2, 9, 7), 3)
assert S.shape == (2, 3)
print("ok")
"""
    env = {k: val for k, val in os.environ.items() if k not in ("C2I_KERNELS", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd="/")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@needs_triton
def test_interpreter_enabled_after_import():
    """Other test modules may import c2i_fast (hence triton and the kernels) before TRITON_INTERPRET=1 is set;
    the launchers must still run the kernels in the interpreter then."""
    code = KERNELS_IMPORT + """
import os
import torch
K = load_kernels()
os.environ["TRITON_INTERPRET"] = "1"
os.environ["C2I_KERNELS"] = "triton"
x, u, v = torch.randn(5, 30), torch.randn(20, 4), torch.randn(30, 4)
assert torch.allclose(K.lowrank_matmul(x, u, v), x @ v @ u.T, atol=1e-4)
ro, ko, ri = torch.tensor([0, 8, 20]), torch.tensor([0, 2, 4]), torch.randperm(20)
assert K.clustered_lowrank_matmul(x, torch.randn(30, 4), torch.randn(20, 2), ri, ro, ko).shape == (5, 20)
assert K.clustered_reconstruct(torch.randn(30, 4), torch.randn(20, 2), ri, ro, ko).shape == (20, 30)
assert K.randomized_svd(torch.randn(2, 20, 30), 3)[1].shape == (2, 3)
print("ok")
"""
    env = {k: val for k, val in os.environ.items() if k not in ("C2I_KERNELS", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd="/")
    if "InterpreterUnavailable" in res.stderr:
        pytest.skip(res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
