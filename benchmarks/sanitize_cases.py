"""Every CUDA kernel variant once, on small awkward inputs: the workload for compute-sanitizer.

The unit tests run far too long under memcheck/racecheck (each launch is 10-100x slower there);
this runs each kernel instantiation the host code can pick (dtypes, 16-byte vector and scalar
paths, decode and prefill launch policies, split-K and single pass, GQA groups above 16,
sampler clusters, cached and uncached slices) once or twice, with a loose comparison against
the reference so a wrong result also fails. Exit 0 when every case ran and matched.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_cases.py
    python benchmarks/sanitize_cases.py --list     # the cases, without a GPU (dry run)
    python benchmarks/sanitize_cases.py --device cpu  # the cases' own code, on the reference ops
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF = (torch.float16, torch.bfloat16)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    if not torch.allclose(a.float(), b.float(), atol=tol, rtol=tol):
        err = (a.float() - b.float()).abs().max().item()
        raise AssertionError(f"max abs error {err:.3g} > {tol}")


def cases(dev: str = "cuda") -> list[tuple[str, Callable[[], None]]]:
    import llmkernels as lk
    from llmkernels import reference as ref

    out: list[tuple[str, Callable[[], None]]] = []

    def add(name):
        def wrap(fn):
            out.append((name, fn))
            return fn

        return wrap

    for dtype in DTYPES:
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        for rows, hidden in ((3, 64), (3, 7), (300, 2048), (2, 9000)):  # vec/scalar, decode/prefill

            @add(f"rms_norm {dtype} {rows}x{hidden}")
            def _(rows=rows, hidden=hidden, dtype=dtype, tol=tol):
                x = torch.randn(rows, hidden, device=dev).to(dtype)
                w = torch.randn(hidden, device=dev).to(dtype)
                _close(lk.rms_norm(x, w), ref.rms_norm(x, w, 1e-6), tol)
                r = torch.randn_like(x)
                x2, r2 = x.clone(), r.clone()
                lk.fused_add_rms_norm(x, r, w)
                ref.fused_add_rms_norm(x2, r2, w, 1e-6)
                _close(x, x2, tol)
                # Gemma's (1 + w) variant
                _close(lk.rms_norm(x, w, unit_offset=True), ref.rms_norm(x, w, 1e-6, True), tol)
                lk.fused_add_rms_norm(x, r, w, unit_offset=True)
                ref.fused_add_rms_norm(x2, r2, w, 1e-6, unit_offset=True)
                _close(x, x2, tol)

        for inter in (64, 7):

            @add(f"silu_and_mul {dtype} {inter}")
            def _(inter=inter, dtype=dtype, tol=tol):
                x = torch.randn(5, 2 * inter, device=dev).to(dtype)
                _close(lk.silu_and_mul(x), ref.silu_and_mul(x), tol)
                _close(lk.gelu_tanh_and_mul(x), ref.gelu_tanh_and_mul(x), tol)

        for rot, neox, pos_dtype in ((64, True, torch.int64), (58, False, torch.int32)):

            @add(f"rotary {dtype} rot={rot} neox={neox}")
            def _(rot=rot, neox=neox, pos_dtype=pos_dtype, dtype=dtype, tol=tol):
                cache = torch.randn(64, rot, device=dev)
                pos = torch.randint(0, 64, (9,), device=dev, dtype=pos_dtype)
                q, k = (
                    torch.randn(9, 4, 64, device=dev).to(dtype),
                    torch.randn(9, 2, 64, device=dev).to(dtype),
                )
                q2, k2 = q.clone(), k.clone()
                lk.rotary_embedding(pos, q, k, cache, is_neox=neox)
                ref.rotary_embedding(pos, q2, k2, cache, neox)
                _close(q, q2, tol)
                _close(k, k2, tol)

        for head_dim in (64, 36):  # vector / scalar copies

            @add(f"kv_cache_append {dtype} D={head_dim}")
            def _(head_dim=head_dim, dtype=dtype):
                kc = torch.randn(2, 2, 8, head_dim, device=dev).to(dtype)
                vc = torch.randn_like(kc)
                k, v = (torch.randn(4, 2, head_dim, device=dev).to(dtype) for _ in range(2))
                slots = torch.tensor([3, 9, 3, -1], device=dev)  # a repeat, a padding token
                kc2, vc2 = kc.clone(), vc.clone()
                lk.kv_cache_append(k, v, kc, vc, slots)
                ref.kv_cache_append(k, v, kc2, vc2, slots)
                assert torch.equal(kc, kc2) and torch.equal(vc, vc2)

    attention_shapes = [
        (head_dim, hq, hk, splits, None)
        for head_dim in (64, 128)
        for hq, hk, splits in ((9, 3, 1), (9, 3, 3), (32, 1, 2))
    ]
    # head_dim 256 (the SIMT kernel): 1, 2, 4 and 8 query heads per block, windowed or not
    attention_shapes += [
        (256, 2, 2, 1, None),
        (256, 8, 4, 3, 50),
        (256, 4, 1, 2, None),
        (256, 9, 1, 1, 7),
    ]
    for dtype in HALF:
        for head_dim, hq, hk, splits, window in attention_shapes:

            @add(f"decode_attention {dtype} D={head_dim} {hq}/{hk} splits={splits} w={window}")
            def _(head_dim=head_dim, hq=hq, hk=hk, splits=splits, window=window, dtype=dtype):
                kc = torch.randn(3, hk, 300, head_dim, device=dev).to(dtype)
                vc = torch.randn_like(kc)
                lens = torch.tensor([0, 1, 300], dtype=torch.int32, device=dev)
                q_wide = torch.randn(2, 3, hq, head_dim + 8, device=dev).to(dtype)
                for q in (
                    q_wide[0, :, :, :head_dim].contiguous(),
                    q_wide[1, :, :, 1:][..., :head_dim],
                ):
                    ws = torch.empty(3, hq, splits, head_dim + 2, device=dev)
                    got = lk.decode_attention(q, kc, vc, lens, workspace=ws, window=window)
                    want = ref.decode_attention(
                        q.float(), kc.float(), vc.float(), lens, window=window
                    )
                    _close(got, want, 2e-2)

    for dtype, batch, vocab in (
        (torch.bfloat16, 1, 128256),  # a cluster of 8 on sm_90
        (torch.float16, 64, 32000),  # smaller clusters
        (torch.float32, 2, 300000),  # slices too large for shared memory: re-read
        (torch.float32, 3, 1001),  # odd size
        (torch.bfloat16, 2, 262144),  # Gemma 3's vocabulary
    ):

        @add(f"sample {dtype} {batch}x{vocab}")
        def _(dtype=dtype, batch=batch, vocab=vocab):
            logits = torch.randn(batch, vocab, device=dev).to(dtype)
            greedy = lk.sample(logits, temperature=0.0, check_values=False)
            assert torch.equal(greedy, logits.float().argmax(-1))
            state = lk.new_rng_state(dev, seed=1)
            ids = lk.sample(logits, 0.8, 50, 0.9, rng_state=state, check_values=False)
            assert int(ids.min()) >= 0 and int(ids.max()) < vocab
            kept = logits.float().topk(50, dim=-1).indices
            assert (kept == ids[:, None]).any(-1).all()  # inside the top-k set

    for dtype in DTYPES:
        for head_dim, unit_offset in ((64, False), (128, True), (256, False)):

            @add(f"qk_norm_rotary {dtype} D={head_dim} unit_offset={unit_offset}")
            def _(dtype=dtype, head_dim=head_dim, unit_offset=unit_offset):
                # Hq 9, Hk 2 (+ v 2): 11 heads, the last block of 4 warps part-filled
                qkv = torch.randn(5, 13 * head_dim, device=dev).to(dtype)
                q = qkv[:, : 9 * head_dim].view(5, 9, head_dim)
                k = qkv[:, 9 * head_dim : 11 * head_dim].view(5, 2, head_dim)
                cache = torch.randn(64, head_dim, device=dev)
                pos = torch.tensor([0, 63, 7, 7, 1], device=dev, dtype=torch.int32)
                w = torch.rand(head_dim, device=dev).to(dtype)
                q2, k2 = q.clone(), k.clone()
                lk.qk_norm_rotary(pos, q, k, w, w, cache, 1e-6, unit_offset=unit_offset)
                ref.qk_norm_rotary(pos, q2, k2, w, w, cache, 1e-6, unit_offset)
                _close(q, q2, 5e-2)
                _close(k, k2, 5e-2)
                if dev != "cpu":  # positions outside the table: the raw op skips the rotary
                    bad = torch.tensor([-1, 64, 0, 1000, 5], device=dev)
                    torch.ops.llmkernels.qk_norm_rotary(bad, q, k, w, w, cache, 1e-6, unit_offset)

    for dtype in HALF:
        # every int8_linear launch variant: M 1 / 2 / 3-4 / 5-8 with 1, 2 or 4 features per
        # warp (N >= 4096: 2, >= 8192: 4), part-filled last blocks and warps, idle lanes in the
        # last K step (K 528), a strided x
        for m, n, k in (
            (1, 33, 528),
            (2, 33, 48),
            (3, 576, 576),
            (8, 33, 528),
            (4, 4099, 32),
            (5, 8197, 32),
        ):

            @add(f"int8_linear {dtype} {m}x{k} -> {n}")
            def _(m=m, n=n, k=k, dtype=dtype):
                x = torch.randn(m, k + 8, device=dev).to(dtype)[:, :k]
                w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
                scale = torch.rand(n, device=dev) / 64
                _close(lk.int8_linear(x, w, scale), ref.int8_linear(x, w, scale), 2e-2)

        # every int4_linear launch variant, as above, with groups of 32, 64 and 128; K 544
        # (17 lane steps of 32 codes) leaves lanes idle in the last step
        for m, n, k, group in (
            (1, 33, 544, 32),
            (2, 33, 64, 64),
            (3, 576, 576, 64),
            (2, 40, 576, 96),  # not a power of two: the group index is divided, not shifted
            (8, 33, 544, 32),
            (4, 4099, 128, 128),
            (5, 8197, 32, 32),
        ):

            @add(f"int4_linear {dtype} {m}x{k} -> {n} (groups of {group})")
            def _(m=m, n=n, k=k, group=group, dtype=dtype):
                x = torch.randn(m, k + 8, device=dev).to(dtype)[:, :k]
                w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
                scale_zero = (torch.rand(n, k // group, 2, device=dev) / 16).to(torch.bfloat16)
                _close(lk.int4_linear(x, w, scale_zero), ref.int4_linear(x, w, scale_zero), 2e-2)

    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the cases, run nothing")
    ap.add_argument("--device", default="cuda", help="cpu: check the cases' code (reference ops)")
    args = ap.parse_args(argv)
    all_cases = cases(args.device)
    if args.list:
        for name, _ in all_cases:
            print(name)
        print(f"{len(all_cases)} cases")
        return 0
    torch.manual_seed(0)
    failed = 0
    for name, fn in all_cases:
        try:
            fn()
            if args.device != "cpu":
                torch.cuda.synchronize()
        except Exception as exc:  # report every case, then fail
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    print(f"sanitize cases: {len(all_cases) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
