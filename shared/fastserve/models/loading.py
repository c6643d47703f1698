"""The one place that turns a model folder into a model: plain, torchao-quantized, head-pruned or ONNX.

Every service that loads a folder (inference serving it, optimization measuring or transforming it,
training fine-tuning it) comes here, so a folder that one service writes loads the same way in all of
them, in every process: a head-pruned folder registers its model types here, explicitly, because its
config.json says so, never because some module that registers them was imported first.

What the folder holds decides how it loads: a `quantization.json` recipe means torchao tensors in
safetensors (`fastserve.models.quantized`), a `fastserve_*_pruned` model type means the pruned classes
(`fastserve.models.pruned`), a lone `model.onnx` means an ONNX Runtime session, anything else is a
transformers checkpoint.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from fastserve.models import pruned
from fastserve.models.kinds import auto_class, folder_label, read_config
from fastserve.models.quantized import is_quantized, load_quantized_torch
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, error_gist

log = logging.getLogger(__name__)
transformers.utils.logging.disable_progress_bar()  # servers and workers log lines, not progress bars

PYTORCH, TORCHAO, ONNX = "pytorch", "torchao", "onnx"
ONNX_FILE = "model.onnx"
# The names a request may give a dtype by; "" is the default, fp32 (a generation model asks for AUTO instead).
AUTO = "auto"
DTYPES = {"": torch.float32, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
# onnxruntime's own exceptions (none derives from OSError or RuntimeError) for a graph it cannot read or run.
_ORT_ERRORS = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
               "RuntimeException", "NotImplemented")


@functools.cache
def folder_errors() -> tuple[type[Exception], ...]:
    """What reading or first running a model folder raises when the folder is at fault (missing or truncated
    files, weights that do not fit the config, a graph onnxruntime refuses): transformers' OSError and
    ValueError, torch's RuntimeError, safetensors' and onnxruntime's own. Callers turn these into
    FailedPrecondition; anything else is a bug and stays INTERNAL."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    from safetensors import SafetensorError

    ort = tuple(getattr(ort_state, name) for name in _ORT_ERRORS if hasattr(ort_state, name))
    return (OSError, ValueError, RuntimeError, SafetensorError, *ort)


def pick_device() -> torch.device:
    """The GPU when there is one: serving and measuring run where a deployment would."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX). Without it torch emulates bf16
    matmuls: measured on an AVX2-only EPYC, 0.6 GFLOP/s against 20 in fp32, so bf16 there is a slowdown."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def auto_dtype(device: torch.device) -> torch.dtype:
    """What AUTO picks: bf16 on a CUDA GPU that supports it (half the bytes of weights and KV cache to read
    each decode step), fp32 on a CPU. bf16 on a CPU with AVX-512 BF16 or AMX is faster (`cpu_has_bf16`;
    `make bench-generation` measures it) but is asked for by name: served by default, a float32 checkpoint
    gives the tokens its own `generate()` gives, which bf16 does not at near-ties."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float32


def torch_dtype(name: str, device: torch.device, field: str = "config.dtype") -> torch.dtype:
    """The dtype a request names (AUTO: `auto_dtype`), refused where it cannot run."""
    if name == AUTO:
        return auto_dtype(device)
    if name not in DTYPES:
        raise InvalidArgument(f"dtype must be one of fp32, bf16, fp16, auto, got {name!r}", field=field)
    if DTYPES[name] is torch.float16 and device.type == "cpu":
        # CPU kernels for half precision are missing or far slower than fp32: refuse rather than crawl.
        raise FailedPrecondition("fp16 needs a GPU; use fp32 or bf16 on CPU")
    return DTYPES[name]


def weights_format(folder: Path) -> str:
    """pytorch, torchao or onnx: what the folder's weights are."""
    folder = Path(folder)
    if is_quantized(folder):
        return TORCHAO
    if (folder / ONNX_FILE).is_file() and not any(any(folder.glob(pattern)) for pattern in _WEIGHTS):
        return ONNX  # exports copy the config but not the PyTorch weights
    return PYTORCH


def _register_if_pruned(folder: Path, field: str) -> None:
    if read_config(folder, field).get("model_type") in pruned.MODEL_TYPES:
        pruned.register()


def load_config(folder: Path, field: str = "model_uri") -> Any:
    """transformers' config of the folder (a pruned model type included)."""
    from transformers import AutoConfig

    _register_if_pruned(folder, field)
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        log.warning("transformers cannot read the config in %s", folder, exc_info=True)
        raise FailedPrecondition(f"transformers cannot read the config of {folder_label(folder)}: "
                                 f"{error_gist(exc)}", field=field) from None


def load_model(folder: Path, kind: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               field: str = "model_uri", **from_pretrained: Any) -> nn.Module:
    """The folder's model with the head of `kind` (`fastserve.models.kinds`), in eval mode.

    dtype: None keeps the saved one; a torchao model keeps its quantized weights whatever is asked.
    device: where to move it (None: stays on the CPU). `from_pretrained` options (a changed `config`,
    `ignore_mismatched_sizes`) go to transformers for a plain checkpoint."""
    folder = Path(folder)
    auto = auto_class(kind)
    fmt = weights_format(folder)
    if fmt == ONNX:
        raise FailedPrecondition(f"{folder_label(folder)} holds an ONNX graph ({ONNX_FILE}) and no PyTorch "
                                 "weights: it runs on ONNX Runtime only", field=field)
    _register_if_pruned(folder, field)
    try:
        if fmt == TORCHAO:
            model = load_quantized_torch(folder, auto, from_pretrained.get("config"))
        else:
            options = dict(from_pretrained) | ({} if dtype is None else {"dtype": dtype})
            model = auto.from_pretrained(str(folder), **options)
    except folder_errors() as exc:
        log.warning("loading the %s in %s failed", kind, folder, exc_info=True)
        raise FailedPrecondition(f"cannot load the {kind} in {folder_label(folder)}: "
                                 f"{type(exc).__name__}: {error_gist(exc)}", field=field) from None
    if device is not None:
        model = model.to(device)
    return model.eval()


def onnx_session(folder: Path, field: str = "config.backend") -> Any:
    """An ONNX Runtime session on the folder's model.onnx: its CUDA provider where there is a GPU, else CPU."""
    import onnxruntime as ort

    folder = Path(folder)
    path = folder / ONNX_FILE
    if not path.is_file():
        raise FailedPrecondition(f"{folder_label(folder)} has no {ONNX_FILE}: ONNX Runtime runs an exported "
                                 "graph (optimization's export step writes one)", field=field)
    # Ask for CUDA only where there is a GPU: onnxruntime-gpu lists its CUDA provider even without one.
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
              and (p != "CUDAExecutionProvider" or torch.cuda.is_available())]
    try:
        session = ort.InferenceSession(str(path), providers=wanted)
    except folder_errors() as exc:
        log.warning("ONNX Runtime refused %s", path, exc_info=True)
        raise FailedPrecondition(f"ONNX Runtime cannot load the {ONNX_FILE} of {folder_label(folder)}: "
                                 f"{type(exc).__name__}: {error_gist(exc)}") from None
    log.info("ONNX Runtime session for %s runs on %s", folder.name, session.get_providers())
    return session
