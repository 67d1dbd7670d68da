"""What the compiled module reports about itself, and that its layout matches the Python side."""

import torch

import mppm_ext
from mppm_ext import STAT_QUANTITIES, TOKEN_QUANTITIES
from mppm_ext._dispatch import compiled


def test_build_info_describes_the_binary():
    info = mppm_ext.build_info()
    assert info["version"] == mppm_ext.__version__
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert set(info["cpu_isas_supported"]) <= set(info["cpu_isas_compiled"])
    assert info["cpu_isas_supported"][-1] == "baseline"
    assert info["cuda"] == (info["cuda_runtime_version"] is not None)
    if not info["cuda"]:
        assert info["cuda_device_count"] == 0
    if torch.cuda.is_available() and info["cuda"]:
        assert info["cuda_device_count"] == torch.cuda.device_count()


def test_output_layout_matches_python():
    C = compiled()
    assert C.NUM_TOKEN_QUANTITIES == len(TOKEN_QUANTITIES)
    assert C.NUM_STAT_COLUMNS == 3 * len(STAT_QUANTITIES) + 1
    assert C.NUM_COUNT_COLUMNS == 2
