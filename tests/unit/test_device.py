import pytest
import torch

from llmprune.engine.core.device import choose_placement, resolve_device, resolve_dtype
from llmprune.engine.core.errors import UserInputError


def test_auto_on_cpu_machine_is_cpu_fp32():
    placement = choose_placement("auto", "auto")
    if not torch.cuda.is_available():
        assert placement.device.type in ("cpu", "mps")
        assert placement.dtype == torch.float32


def test_explicit_dtypes_and_aliases():
    cpu = torch.device("cpu")
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("auto", cpu) == torch.float32


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_is_user_error(spec):
    with pytest.raises(UserInputError):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_user_error():
    with pytest.raises(UserInputError, match="no CUDA GPU"):
        resolve_device("cuda:0")


def test_unknown_dtype_is_user_error():
    with pytest.raises(UserInputError):
        resolve_dtype("int8", torch.device("cpu"))
