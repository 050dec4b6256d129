"""The tools' dtype names (`--dtype fp32|bf16|fp16`), and `--dtype auto`: the dtype a forward runs fastest in on the
device (the package's `preferred_dtype`: bf16 on a CUDA GPU with bf16 and on a CPU with native bf16 matmuls, fp32
elsewhere) with the line a run prints about the choice."""

from typing import Union

import torch

from ..navit_core import preferred_dtype, preferred_dtype_reason


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # `--dtype` name -> torch dtype
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def resolve_dtype(requested: str, device: Union[torch.device, str]) -> tuple[str, str]:
    """The dtype name (`fp32`, `bf16` or `fp16`) that `--dtype requested` means on `device`, and one summary line
    saying what was chosen and why."""
    if requested != "auto":
        return requested, f"dtype: {requested} (set by --dtype {requested})"
    name = NAMES[preferred_dtype(device)]
    other = "fp32" if name != "fp32" else "bf16"
    return name, f"dtype: {name} (--dtype auto: {preferred_dtype_reason(device)}; --dtype {other} forces {other})"
