"""The one --device parser."""

from __future__ import annotations

import pytest
import torch

from edgeft.devices import cuda_index, parse_device, torch_device
from edgeft.errors import InputError


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"), ("cuda:1", "cuda:1")])
def test_parse_device_normalizes(text, expected):
    assert parse_device(text) == expected


@pytest.mark.parametrize("text", ["tpu", "cuda:x", "cuda:", "cpu:0", "auto:1", "", "mps", "cuda:-1"])
def test_parse_device_refuses(text):
    with pytest.raises(InputError, match="is not a device"):
        parse_device(text)


def test_auto_can_be_refused():
    with pytest.raises(InputError, match="cpu \\| cuda"):
        parse_device("auto", allow_auto=False)


def test_cuda_index():
    assert cuda_index("cuda") == 0 and cuda_index("cuda:3") == 3


def test_torch_device():
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_cuda_is_refused():
    with pytest.raises(InputError, match="CUDA is not usable"):
        torch_device("cuda")
