"""The decode-step profile (llmkernels.perf.step_profile) on the CPU: every op of the step with
its calls and time per step; gpu_check.sh runs it on a GPU, where the rows are kernels."""

import json

import torch

from llmkernels.perf import step_profile


def test_cpu_step_profile_lists_the_step_ops(tmp_path):
    result = step_profile.profile_step(
        "tiny", 1, 16, 3, torch.device("cpu"), torch.float32, tmp_path
    )
    ops = {r["op"]: r for r in result["rows"]}
    layers = 2  # the "tiny" bench config
    # one fused QKV, O, gate/up and down GEMM per layer, and the LM head
    assert ops["aten::mm"]["calls_per_step"] == 4 * layers + 1
    assert abs(sum(r["share"] for r in result["rows"]) - 1) < 1e-6
    summary = result["summary"]
    assert summary["eager_step_us"] > 0 and summary["ops_us_per_step"] > 0
    saved = json.loads((tmp_path / "step_profile.json").read_text())
    assert saved["rows"] and saved["config"] == "tiny"
