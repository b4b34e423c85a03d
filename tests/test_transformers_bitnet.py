"""Real third-party code: HF transformers' BitNet quantizers pass ``check`` with a few lines of
glue, in float32 -- the dtype they compute in. Skipped without transformers and torch."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
bitnet = pytest.importorskip("transformers.integrations.bitnet",
                             reason="transformers is not installed")

from minisparse.oracle.harness import check  # noqa: E402

N = 60


# The glue (README, "check your kernel"): apply the autograd Functions, with torch.compile off
# (it needs a C compiler and minutes; the math is the same eagerly).
def hf_act_quant(x):
    with torch._dynamo.config.patch(disable=True):
        return bitnet.ActQuant.apply(x)


def hf_weight_quant(w):
    with torch._dynamo.config.patch(disable=True):
        return bitnet.WeightQuant.apply(w)


def hf_int8_codes(x):  # BitLinear's inference-time quantizer: (int8 codes, scale)
    with torch._dynamo.config.patch(disable=True):
        return bitnet.BitLinear.activation_quant(None, x)


@pytest.mark.parametrize("op, fn", [("absmax_fake", hf_act_quant),
                                    ("absmean_fake", hf_weight_quant),
                                    ("absmax", hf_int8_codes)])
def test_hf_bitnet_quantizers_conform_in_float32(op, fn):
    report = check(op, fn, dtypes=("float32",), max_examples=N)
    assert report.passed, str(report)


def test_the_float64_contract_difference_is_reported():
    # ActQuant / WeightQuant compute in float32 (x.float()) and cast back. On float64 rows of
    # ordinary size their values carry float32 rounding, far outside float64's tolerance ...
    report = check("absmax_fake", hf_act_quant, dtypes=("float64",), max_examples=N,
                   fixed={"magnitude": "one"})
    assert not report.passed and report.mismatch is not None, str(report)
    relative = report.mismatch.max_error / np.abs(report.expected).max()
    assert 1e-12 < relative < 1e-6, str(report)
    # ... and rows beyond float32's range come back as inf / NaN
    report = check("absmax_fake", hf_act_quant, dtypes=("float64",), max_examples=N,
                   fixed={"magnitude": "huge"})
    assert not report.passed and not np.isfinite(report.got).all(), str(report)
