"""The ptxas resource gate (benchmarks/resource_gate.py) on synthetic ptxas reports: what it
accepts and what it fails. CI runs it on the real build's report."""

import importlib.util
import sys
from pathlib import Path

import pytest

GATE = Path(__file__).resolve().parent.parent / "benchmarks" / "resource_gate.py"
spec = importlib.util.spec_from_file_location("resource_gate", GATE)
gate = importlib.util.module_from_spec(spec)
sys.modules["resource_gate"] = gate  # dataclasses look their module up while the file runs
spec.loader.exec_module(gate)

# decode_attention_kernel<__nv_bfloat16, 128, true> and sample_kernel<float, true>, mangled
ATTENTION = (
    "_ZN10llmkernels51_GLOBAL__N__3a8c4e3a_12_attention_cu_2a9f8b1b_1234523decode_attention_kernel"
    "I13__nv_bfloat16Li128ELb1EEEvPT_PfPKS3_S7_S7_PKilllllllllf"
)
SAMPLE = (
    "_ZN10llmkernels50_GLOBAL__N__5b1e0c7d_11_sampling_cu_6d2a1c9e_1234513sample_kernelIfLb1EEEvPlPKT_"
    "PKfPKiS7_PKllliiii"
)


def report(name, arch, registers, smem=0, spills=0, stack=0):
    return (
        f"ptxas info    : Compiling entry function '{name}' for 'sm_{arch}'\n"
        f"ptxas info    : Function properties for {name}\n"
        f"    {stack} bytes stack frame, {spills} bytes spill stores, {spills} bytes spill loads\n"
        f"ptxas info    : Used {registers} registers, used 1 barriers, {smem} bytes smem, 400 bytes cmem[0]\n"
    )


def run(tmp_path, text, archs=(80, 90)):
    log = tmp_path / "ptxas.log"
    log.write_text(text)
    out = tmp_path / "ptxas.md"
    code = gate.main([str(log), "--arch", *map(str, archs), "--out", str(out)])
    return code, out.read_text() if out.exists() else ""


def clean():
    return "".join(
        report(ATTENTION, arch, 168, smem=33536) + report(SAMPLE, arch, 64, smem=33232)
        for arch in (80, 90)
    )


def test_clean_report_passes_and_is_tabulated(tmp_path):
    code, table = run(tmp_path, clean())
    assert code == 0
    assert "| decode_attention_kernel<bf16, 128, true> | sm_90 | 168 / 168 |" in table
    assert "| sample_kernel<fp32, true> | sm_80 | 64 / 128 |" in table
    assert "33232 / 166912" in table  # the cached sampler's opted-in limit on sm_80


@pytest.mark.parametrize(
    "bad, message",
    [
        (report(ATTENTION, 90, 160, smem=33536, spills=8), "spills"),
        (report(ATTENTION, 90, 160, smem=33536, stack=16), "stack frame"),
        (report(ATTENTION, 90, 176, smem=33536), "176 registers > 168"),
        (report(ATTENTION, 90, 160, smem=50000), "shared memory > 49152"),
        (report("_Z12other_kernelPf", 90, 16), "not in benchmarks/resource_gate.py KERNELS"),
    ],
    ids=["spill", "stack", "registers", "smem", "unknown"],
)
def test_gate_fails(tmp_path, capsys, bad, message):
    code, _ = run(tmp_path, clean() + bad)
    assert code == 1
    assert message in capsys.readouterr().err


def test_missing_arch_fails(tmp_path, capsys):
    code, _ = run(tmp_path, clean(), archs=(80, 90, 100))
    assert code == 1 and "no kernel compiled for sm_100" in capsys.readouterr().err
