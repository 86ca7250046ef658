"""The CPU projection-sweep benchmark (llmkernels.perf.cpu_gemv): the sweep multiplies exactly
what a decode step does, and every formulation computes the same product."""

import json

import torch

from llmkernels.perf import cpu_gemv
from llmkernels.perf.generate import CONFIGS


def test_sweep_covers_the_step_projections():
    shapes = cpu_gemv.projection_shapes("smollm2-135m")
    c = CONFIGS["smollm2-135m"]
    assert len(shapes) == 4 * c["num_hidden_layers"] + 1
    assert shapes[0] == ((9 + 2 * 3) * 64, 576) and shapes[-1] == (49152, 576)
    # with the 61 norms of 576, SmolLM2-135M's parameter count (its LM head is the embedding)
    assert sum(o * i for o, i in shapes) + 61 * 576 == 134_515_008


def test_formulations_agree_with_fp32_linear():
    weight = torch.randn(96, 64) / 8
    x = torch.randn(3, 64)
    with torch.inference_mode():
        expected = x @ weight.t()
        cases = [
            ("fp32-in-major", 1e-5),
            ("fp32-onednn", 1e-5),
            ("bf16", 0.05),
            ("bf16-onednn", 0.05),
            ("int8", 0.05),
        ]
        for formulation, tol in cases:
            fn, nbytes = cpu_gemv._matmul(formulation, weight)
            assert nbytes > 0
            torch.testing.assert_close(fn(x).float(), expected, atol=tol, rtol=tol)


def test_run_writes_a_table(tmp_path):
    rows = cpu_gemv.run("tiny", [1, 2], ["fp32", "int4"], tmp_path)
    assert [(r["rows"], r["formulation"]) for r in rows] == [
        (1, "fp32"),
        (1, "int4"),
        (2, "fp32"),
        (2, "int4"),
    ]
    assert all(r["ms"] > 0 and r["GB_s"] > 0 for r in rows)
    assert rows[0]["speed_vs_fp32"] == 1
    saved = json.loads((tmp_path / "cpu_gemv.json").read_text())
    assert len(saved["rows"]) == 4 and (tmp_path / "cpu_gemv.md").exists()
