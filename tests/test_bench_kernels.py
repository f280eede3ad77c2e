import pytest
import torch
from conftest import run_cli

from smartedit.bench.kernels import main, to_markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_kernel_benchmark_says_it_is_skipped_without_a_gpu(capsys, tmp_path):
    code, out, _ = run_cli(main, ["--out", tmp_path / "unused"], capsys)
    assert code == 0 and "skipped: no CUDA GPU here" in out and not (tmp_path / "unused").exists()


def test_markdown_table_keeps_units_and_missing_cells():
    md = to_markdown({"device": "Card", "torch": "2", "triton": "3",
                      "peaks": {"fp16_matmul_tflops": 700.0, "copy_GBps": 3000.0},
                      "rows": [{"what": "token->image", "batch": 1, "triton_ms": 0.01, "sdpa_ms": 0.02,
                                "eager_ms": 0.05, "speedup_vs_eager": 5.0, "speedup_vs_sdpa": 2.0,
                                "frac_peak_flops": 0.01, "frac_peak_bytes": 0.1},
                               {"what": "whole BIM forward", "batch": 8, "triton_ms": 1.0, "eager_ms": 2.5,
                                "speedup_vs_eager": 2.5}]})
    assert "700 TFLOP/s fp16 matmul" in md
    assert "| token->image | 1 | 0.0100 | 0.0200 | 0.0500 | 5.00 | 2.00 | 1.0% | 10.0% |" in md
    assert "| whole BIM forward | 8 | 1.0000 | - | 2.5000 | 2.50 | - | - | - |" in md
