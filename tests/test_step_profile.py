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


def test_kernel_names_keep_the_kernel_not_the_namespace():
    # CUDA kernels as the profiler names them; the H200 run of 2026-12-01 printed all of ours as
    # "llmkernels::" (cut at the "(" of "(anonymous namespace)")
    short = step_profile._short
    assert (
        short(
            "void llmkernels::(anonymous namespace)::decode_attention_kernel<__nv_bfloat16, 128>"
            "(__nv_bfloat16 const*, float*, int)"
        )
        == "llmkernels::decode_attention_kernel<__nv_bfloat16, 128>"
    )
    assert short("void at::native::(anonymous namespace)::f<(int)4>(float*)") == (
        "at::native::f<(int)4>"
    )
    assert (
        short("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT") == "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT"
    )
    assert short("aten::mm") == "aten::mm"
    assert len(short("void k<" + "x" * 200 + ">(int)")) == 70
