"""The CUDA sampling kernel (csrc/sampling.cu) against the exact sampling distribution.

Statistical checks (sampling_stats.assert_distribution, 10^5 draws per case unless noted): no draw
outside the top-k / top-p set, ever; chi-square and total variation within bounds set by the number
of draws. The expected distribution is ``reference.sampling_probs`` on the logits as the kernel
sees them (rounded to the test dtype), with top_p nudged into a gap of the cumulative masses
(``robust_top_p``) so that fp32 rounding cannot flip a boundary token. Large batches run one CTA
per row; batches of 8-200 rows run the thread-block-cluster paths (8, 4, 2 CTAs per row on H100).
Also: exact greedy, seeding, on-device RNG offsets, CUDA-graph replay, per-row parameters,
non-finite inputs with ``check_values=False``, strided / misaligned rows, odd sizes, opcheck.
"""

import pytest
import torch
from conftest import requires_cuda
from sampling_stats import assert_distribution, fixture_logits, robust_top_p, synthetic_logits

import llmkernels as lk
from llmkernels import reference as ref

pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = "cuda"
N_DRAWS = 100_000
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def row_logits(kind: str, vocab: int) -> torch.Tensor:
    """fp32 ``[vocab]`` logits on CPU: a synthetic kind, or ``fixture<i>`` (SmolLM2 row i)."""
    if kind.startswith("fixture"):
        row = fixture_logits()[int(kind[len("fixture") :])]
        assert row.numel() == vocab
        return row
    return synthetic_logits(kind, vocab, seed=vocab % 1009)


def expected(logits: torch.Tensor, dtype, temperature: float, top_k: int, top_p: float):
    """(robust top_p, expected probabilities [V] on CPU) for logits as the kernel sees them."""
    seen = logits.to(dtype).float()
    top_p = robust_top_p(seen, temperature, top_k, top_p)
    return top_p, ref.sampling_probs(seen[None], temperature, top_k, top_p)[0]


def draw_expanded(logits, dtype, temperature, top_k, top_p, n=None, seed=0):
    """n (default N_DRAWS) draws from one row expanded to n rows (row stride 0: stays in L2)."""
    n = n or N_DRAWS
    x = logits.to(DEVICE, dtype)[None].expand(n, -1)
    return lk.sample(x, temperature, top_k, top_p, seed=seed, check_values=False).cpu()


def draw_in_batches(logits, dtype, temperature, top_k, top_p, batch, n=None, seed=0):
    """n (default N_DRAWS) draws in calls of `batch` rows sharing one rng_state (fresh per call)."""
    n = n or N_DRAWS
    x = logits.to(DEVICE, dtype)[None].expand(batch, -1)
    state = lk.new_rng_state(DEVICE, seed=seed)
    out = torch.empty((n // batch, batch), dtype=torch.int64, device=DEVICE)
    for i in range(n // batch):
        lk.sample(x, temperature, top_k, top_p, rng_state=state, check_values=False, out=out[i])
    assert int(state[1]) == n // batch
    return out.flatten().cpu()


# ---- distributions, one CTA per row (large batches) ------------------------------------------------
CASES = [  # (logits kind, vocab, temperature, top_k, top_p)
    ("zipf", 32000, 1.0, 0, 1.0),
    ("zipf", 32000, 0.7, 50, 0.9),
    ("zipf", 32000, 1.0, 0, 0.8),
    ("zipf", 32000, 1.5, 200, 1.0),
    ("zipf", 32000, 0.5, 0, 0.5),
    ("zipf", 32000, 1.0, 1, 1.0),
    ("near_uniform", 32000, 1.0, 0, 1.0),
    ("near_uniform", 32000, 0.7, 1000, 1.0),
    ("one_hot", 32000, 1.0, 0, 1.0),
    ("one_hot", 32000, 0.7, 50, 0.9),
    ("ties", 32000, 1.0, 37, 1.0),
    ("ties", 32000, 0.8, 0, 0.9),
    ("ties", 32000, 1.0, 31999, 0.999),
    ("fixture0", 49152, 1.0, 0, 1.0),
    ("fixture0", 49152, 0.7, 50, 0.9),
    ("fixture0", 49152, 1.0, 0, 0.9),
    ("fixture2", 49152, 0.6, 20, 1.0),
    ("fixture2", 49152, 1.2, 0, 0.95),
    ("fixture3", 49152, 1.0, 40, 0.5),
    ("zipf", 128256, 0.7, 50, 0.9),
    ("zipf", 128256, 1.0, 0, 0.95),
    ("zipf", 151936, 0.7, 50, 0.9),
    ("zipf", 151936, 1.0, 0, 1.0),
    ("near_uniform", 151936, 1.0, 0, 1.0),
    ("zipf", 262144, 0.7, 64, 0.95),  # Gemma 3: 64 KB (bf16) / 128 KB (fp32) slices per CTA
    ("zipf", 262144, 1.0, 0, 1.0),
    ("ties", 262144, 1.0, 0, 0.9),  # near_uniform has no robust top_p gap at this size
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind, vocab, temperature, top_k, top_p", CASES)
def test_distribution(kind, vocab, temperature, top_k, top_p, dtype):
    logits = row_logits(kind, vocab)
    top_p, probs = expected(logits, dtype, temperature, top_k, top_p)
    draws = draw_expanded(logits, dtype, temperature, top_k, top_p, seed=vocab + top_k)
    assert_distribution(
        draws, probs, f"{kind} V={vocab} {dtype} T={temperature} k={top_k} p={top_p:.4f}"
    )


# ---- distributions through the cluster paths (small batches, many calls) --------------------------
@pytest.mark.parametrize("batch", [8, 100, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "kind, vocab, temperature, top_k, top_p",
    [
        ("zipf", 128256, 0.7, 50, 0.9),
        ("fixture1", 49152, 1.0, 0, 0.95),
        ("zipf", 32000, 0.9, 0, 1.0),
    ],
)
def test_distribution_small_batches(kind, vocab, temperature, top_k, top_p, dtype, batch):
    logits = row_logits(kind, vocab)
    top_p, probs = expected(logits, dtype, temperature, top_k, top_p)
    n = N_DRAWS // batch * batch
    draws = draw_in_batches(logits, dtype, temperature, top_k, top_p, batch, n=n, seed=batch)
    assert_distribution(
        draws, probs, f"{kind} V={vocab} {dtype} batch={batch} T={temperature} k={top_k}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [1, 3, 1001, 32001])
def test_odd_sizes_and_misaligned_strided_rows(vocab, dtype):
    # A view 1 element into a buffer with row stride vocab + 14: row starts are misaligned by
    # varying amounts, so the kernel takes the scalar load path for some rows and the vector path
    # for others. The padding around the view holds 99.0, which must never be drawn.
    logits = synthetic_logits("zipf", vocab, seed=vocab)
    temperature, top_k = 0.8, min(50, vocab)
    top_p, probs = (
        expected(logits, dtype, temperature, top_k, 0.9) if vocab > 1 else (1.0, torch.ones(1))
    )
    rows = 2000
    storage = torch.full((rows, vocab + 14), 99.0, dtype=dtype, device=DEVICE)
    x = storage[:, 1 : vocab + 1]
    x.copy_(logits.to(DEVICE, dtype)[None].expand(rows, -1))
    state = lk.new_rng_state(DEVICE, seed=vocab)
    draws = torch.cat(
        [
            lk.sample(x, temperature, top_k, top_p, rng_state=state, check_values=False)
            for _ in range(N_DRAWS // rows)
        ]
    )
    assert_distribution(draws.cpu(), probs, f"misaligned V={vocab} {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [10_000, 8])
def test_vocab_too_large_for_shared_memory(batch):
    # 400k fp32 logits (1.6 MB per row) exceed shared memory even split over 8 CTAs: the kernel
    # re-reads its slice from L2 in every pass. 10^4 draws here (each reads the row 2-6 times).
    vocab, n = 400_000, 10_000
    logits = synthetic_logits("zipf", vocab, seed=3)
    for temperature, top_k, top_p in [(0.7, 50, 0.9), (1.0, 0, 1.0)]:
        top_p, probs = expected(logits, torch.float32, temperature, top_k, top_p)
        if batch == n:
            draws = draw_expanded(logits, torch.float32, temperature, top_k, top_p, n=n, seed=1)
        else:
            draws = draw_in_batches(logits, torch.float32, temperature, top_k, top_p, batch, n=n)
        assert_distribution(draws, probs, f"V={vocab} batch={batch} T={temperature} k={top_k}")


# ---- greedy --------------------------------------------------------------------------------------------
def lowest_argmax(x: torch.Tensor) -> torch.Tensor:
    is_max = x == x.max(dim=-1, keepdim=True).values
    idx = torch.arange(x.shape[-1], device=x.device).expand_as(x)
    return torch.where(is_max, idx, x.shape[-1]).min(dim=-1).values


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [32000, 49152, 128256, 151936, 262144])
@pytest.mark.parametrize("batch", [1, 8, 300])
def test_greedy_exact_with_ties(vocab, dtype, batch):
    gen = torch.Generator(device=DEVICE).manual_seed(vocab + batch)
    x = torch.randn(batch, vocab, device=DEVICE, generator=gen).to(dtype)
    top = x.max(dim=-1, keepdim=True).values
    x = torch.where(
        torch.rand(batch, vocab, device=DEVICE, generator=gen) < 1e-4, top, x
    )  # tied maxima
    x[0, -1] = top[0, 0]  # a maximum at the last index
    if batch > 1:
        x[1] = 0.5  # a constant row: index 0
    if batch > 2:
        x[2, 0] = top[2, 0] + 1  # unique maximum at index 0
    want = lowest_argmax(x)
    assert torch.equal(want, torch.argmax(x, dim=-1))
    zeros = torch.zeros(batch, device=DEVICE)  # a tensor: the kernel, not the Python-0 shortcut
    for top_k, top_p in [(0, 1.0), (50, 0.9), (1, 0.1)]:
        got = lk.sample(x, zeros, top_k, top_p, seed=1)
        assert torch.equal(got, want)
    assert torch.equal(lk.sample(x, 0.0), want)


# ---- seeding and the on-device RNG offset --------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 8, 4096])
def test_seed_reproducible(batch):
    logits = row_logits("fixture1", 49152).to(DEVICE, torch.bfloat16)[None].expand(batch, -1)
    a = torch.stack([lk.sample(logits, 0.9, 40, 0.95, seed=123) for _ in range(20)])
    b = torch.stack([lk.sample(logits, 0.9, 40, 0.95, seed=123) for _ in range(20)])
    c = torch.stack([lk.sample(logits, 0.9, 40, 0.95, seed=124 + i) for i in range(200)])
    assert torch.equal(a, b)
    assert torch.equal(a, a[:1].expand_as(a))  # same seed, same offset: same tokens every time
    assert (a[0] != c).float().mean() > 0.3  # other seeds, other tokens


def test_rng_state_advances_on_device():
    logits = row_logits("fixture0", 49152).to(DEVICE, torch.float16)[None].expand(512, -1)
    state = lk.new_rng_state(DEVICE, seed=77)
    draws = []
    for i in range(5):
        draws.append(lk.sample(logits, 1.0, 0, 0.9, rng_state=state, check_values=False))
        assert state.tolist() == [77, i + 1]
    for a, b in zip(draws, draws[1:]):
        assert (a != b).float().mean() > 0.3
    # any (seed, offset) replays its draws; the offset, not the call count, selects them
    state.copy_(torch.tensor([77, 3]))
    assert torch.equal(
        lk.sample(logits, 1.0, 0, 0.9, rng_state=state, check_values=False), draws[3]
    )
    state.copy_(torch.tensor([78, 3]))
    assert (
        lk.sample(logits, 1.0, 0, 0.9, rng_state=state, check_values=False) != draws[3]
    ).float().mean() > 0.3
    # rows of one call are independent draws, not copies
    assert draws[0].unique().numel() > 10


# ---- CUDA graphs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [8, 1000])
def test_cuda_graph_replays_fresh_draws(batch):
    vocab, dtype = 32000, torch.bfloat16
    logits_row = row_logits("zipf", vocab)
    top_p, probs = expected(logits_row, dtype, 0.7, 50, 0.9)
    logits = logits_row.to(DEVICE, dtype)[None].expand(batch, -1)
    temperature = torch.full((batch,), 0.7, device=DEVICE)
    top_k = torch.full((batch,), 50, dtype=torch.int32, device=DEVICE)
    top_p_t = torch.full((batch,), top_p, device=DEVICE)
    state = lk.new_rng_state(DEVICE, seed=5)
    out = torch.empty(batch, dtype=torch.int64, device=DEVICE)

    def step():
        lk.sample(logits, temperature, top_k, top_p_t, rng_state=state, check_values=False, out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    offset = int(state[1])
    replays = N_DRAWS // batch
    results = torch.empty((replays, batch), dtype=torch.int64, device=DEVICE)
    for i in range(replays):
        graph.replay()
        results[i].copy_(out)
    torch.cuda.synchronize()
    assert int(state[1]) == offset + replays
    changed = (results[1:] != results[:-1]).float().mean()
    assert changed > 0.3, f"replays repeat their draws (only {changed:.2f} of tokens change)"
    assert_distribution(results.flatten().cpu(), probs, f"graph replays batch={batch}")


# ---- per-row parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_groups", [8, 2500])
def test_mixed_rows(batch_groups):
    vocab, dtype = 49152, torch.bfloat16
    logits = row_logits("fixture2", vocab)
    settings = [
        (0.0, 0, 1.0),
        (0.7, 50, 0.9),
        (1.0, 0, 1.0),
        (1.2, 10, 0.8),
        (0.0, 5, 0.5),
        (0.9, 0, 0.7),
    ]
    settings = [(t, k, expected(logits, dtype, t, k, p)[0] if t > 0 else p) for t, k, p in settings]
    groups = len(settings)
    batch = groups * batch_groups
    temperature = torch.tensor([s[0] for s in settings], device=DEVICE).repeat(batch_groups)
    top_k = torch.tensor([s[1] for s in settings], dtype=torch.int32, device=DEVICE).repeat(
        batch_groups
    )
    top_p = torch.tensor([s[2] for s in settings], device=DEVICE).repeat(batch_groups)
    x = logits.to(DEVICE, dtype)[None].expand(batch, -1)
    state = lk.new_rng_state(DEVICE, seed=31)
    calls = -(-N_DRAWS // batch_groups)
    draws = torch.stack(
        [
            lk.sample(x, temperature, top_k, top_p, rng_state=state, check_values=False)
            for _ in range(calls)
        ]
    ).cpu()  # [calls, batch]
    argmax = int(lowest_argmax(logits.to(dtype).float()))
    for g, (t, k, p) in enumerate(settings):
        mine = draws[:, g::groups].flatten()
        if t == 0:
            assert torch.equal(mine, torch.full_like(mine, argmax)), f"greedy group {g}"
        else:
            probs = expected(logits, dtype, t, k, p)[1]
            assert_distribution(mine, probs, f"mixed rows group {g} (T={t}, k={k}, p={p:.3f})")


# ---- non-finite inputs and unchecked parameters --------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_nonfinite_and_invalid_rows_give_valid_ids(vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    base = torch.randn(vocab, generator=gen)
    top = int(base.argmax())
    base[top] += 2.0  # unique maximum in every dtype
    perm = torch.randperm(vocab, generator=gen)
    nan_at = perm[perm != top][:50]
    rows, allowed = [], []  # (logits, T, k, p), allowed ids (None: any id in [0, V))

    def add(x, t=1.0, k=0, p=1.0, ok=None):
        rows.append((x, t, k, p))
        allowed.append(ok)

    all_nan = torch.full((vocab,), float("nan"))
    add(all_nan, ok=[0])
    some_nan = base.clone()
    some_nan[nan_at] = float("nan")
    add(some_nan, 1.0, 50, 0.9, ok=None)  # checked below: never a NaN position
    add(some_nan, 0.0, ok=[top])
    pos_inf = base.clone()
    pos_inf[[777, 123]] = float("inf")
    add(pos_inf, ok=[123])
    add(torch.full((vocab,), float("-inf")), ok=[0])
    one_finite = torch.full((vocab,), float("-inf"))
    one_finite[vocab - 5] = -3.0
    add(one_finite, 0.7, 50, 0.9, ok=[vocab - 5])
    two_finite = torch.full((vocab,), float("-inf"))
    two_finite[[11, vocab - 1]] = 1.0
    add(two_finite, ok=[11, vocab - 1])
    add(base, 1.0, 0, 0.0, ok=[top])  # top_p 0
    add(base, 1.0, 0, -1.0, ok=[top])
    add(base, 1.0, 0, float("nan"), ok=[top])
    add(base, 1.0, 0, 2.0)
    add(base, 1.0, -5, 1.0)
    add(base, 1.0, 10**9, 0.9)
    add(base, 1.0, 1, 1.0, ok=[top])  # top-k 1
    add(base, float("nan"), ok=[top])  # temperature NaN: greedy
    add(base, -1.0, ok=[top])
    add(base, 1e-30, 0, 0.9, ok=[top])
    add(base, float("inf"), 50, 0.9)
    add(base, 1e30)
    add(pos_inf, float("inf"), ok=[123])
    batch = len(rows)
    x = torch.stack([r[0] for r in rows]).to(DEVICE, dtype)
    temperature = torch.tensor([r[1] for r in rows], device=DEVICE)
    top_k = torch.tensor([r[2] for r in rows], dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([r[3] for r in rows], device=DEVICE)
    state = lk.new_rng_state(DEVICE, seed=0)
    for _ in range(50):
        got = lk.sample(x, temperature, top_k, top_p, rng_state=state, check_values=False).cpu()
        assert got.shape == (batch,)
        assert bool(((got >= 0) & (got < vocab)).all()), f"out-of-range ids: {got.tolist()}"
        for i, ok in enumerate(allowed):
            if ok is not None:
                assert int(got[i]) in ok, f"row {i}: got {int(got[i])}, allowed {ok}"
        assert int(got[1]) not in set(nan_at.tolist()), "drew a NaN logit"
    with pytest.raises(ValueError, match="logits"):  # and the checked path refuses them
        lk.sample(x, temperature, top_k, top_p, seed=0)


# ---- custom-op registration ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck(dtype):
    batch, vocab = 4, 1000
    args = (
        torch.empty(batch, dtype=torch.int64, device=DEVICE),
        torch.randn(batch, vocab, device=DEVICE).to(dtype),
        torch.full((batch,), 0.8, device=DEVICE),
        torch.full((batch,), 20, dtype=torch.int32, device=DEVICE),
        torch.full((batch,), 0.9, device=DEVICE),
        lk.new_rng_state(DEVICE, seed=1),
    )
    torch.library.opcheck(torch.ops.llmkernels.sample.default, args)


# ---- the first call of the process inside a graph capture ------------------------------------------
FIRST_CALL_IN_CAPTURE = """
import torch, llmkernels as lk
torch.manual_seed(0)
logits = torch.randn(4, 128256, device="cuda", dtype=torch.bfloat16)
state = lk.new_rng_state("cuda", seed=3)
out = torch.empty(4, dtype=torch.int64, device="cuda")
params = [torch.full((4,), v, device="cuda") for v in (0.8, 0.9)]
top_k = torch.full((4,), 40, dtype=torch.int32, device="cuda")
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # the kernels' one-time set-up runs inside this capture
    lk.sample(logits, params[0], top_k, params[1], rng_state=state, check_values=False, out=out)
graph.replay()
torch.cuda.synchronize()
replayed = out.clone()
again = lk.sample(logits, params[0], top_k, params[1], rng_state=lk.new_rng_state("cuda", seed=3),
                  check_values=False)
assert torch.equal(replayed, again), (replayed, again)
assert int(state[1]) == 1
print("ok")
"""


def test_first_sample_call_inside_graph_capture():
    import subprocess
    import sys

    # a fresh process: every once-per-device set-up of the sampling kernel is still to run
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALL_IN_CAPTURE], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# ---- the one-CTA-per-row path of GPUs before Hopper, on this one ---------------------------------
_DRAWS_SCRIPT = """
import torch, llmkernels as lk
from sampling_stats import synthetic_logits
rows = []
for vocab in (32000, 128256, 262144):
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 8):
            x = synthetic_logits("zipf", vocab, seed=vocab % 1009).to("cuda", dtype)
            x = x[None].expand(batch, -1)
            for seed in range(20):
                rows.append(lk.sample(x, 0.8, 0, 0.95, seed=seed).cpu())
                rows.append(lk.sample(x, 0.7, 50, 0.9, seed=seed).cpu())
            rows.append(lk.sample(x, 0.0, 0, 1.0).cpu())
print(" ".join(map(str, torch.cat(rows).tolist())))
"""


@pytest.mark.parametrize("cap", ["1", "2"])
def test_capped_clusters_draw_the_same_tokens(cap):
    """LLMKERNELS_SAMPLE_MAX_CLUSTER=1 makes this GPU take the path of GPUs before Hopper (one
    CTA per row; a 128K or 256K vocabulary re-read from L2 on every pass). The kept set and each
    token's random number do not depend on how a row is split, so every draw must be the same
    token as with clusters of 8."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))
    env.pop("LLMKERNELS_SAMPLE_MAX_CLUSTER", None)
    outs = {}
    for name, extra in (("default", {}), ("capped", {"LLMKERNELS_SAMPLE_MAX_CLUSTER": cap})):
        run = subprocess.run(
            [sys.executable, "-c", _DRAWS_SCRIPT],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        outs[name] = [int(t) for t in run.stdout.split()]
    assert len(outs["default"]) == 3 * 2 * (1 + 8) * 41
    assert outs["default"] == outs["capped"]
