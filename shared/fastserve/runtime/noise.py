"""Known-harmless messages that libraries log while they are imported, dropped once where a process starts.

Importing torchao on a machine without its CUDA kernels logs, on the `torchao` logger, one
`Failed to load .../torchao/_C....so: ...` line for each prebuilt extension it cannot load (FastServe's
quantization methods do not use them), and torchao's `@register_as_pytree_constant` on its Enum
configs makes torch log a deprecation warning on `torch.utils._pytree`. Every service and worker log
would start with these lines, and a real warning is easy to miss among them.

The quantizer of onnxruntime also logs a line on the root logger for every tensor it leaves in float.

Each filter sits on the one logger that emits the message and drops only records whose text matches
the message's exact pattern: anything else those loggers say is still logged.
"""

from __future__ import annotations

import logging
import re

KNOWN_NOISE: dict[str, tuple[re.Pattern[str], ...]] = {
    # torchao/__init__.py: logger.warning(f"Failed to load {file}: {e}") for each _C*.so it globs.
    "torchao": (re.compile(r"Failed to load \S*/torchao/_C[^/\s]*\.so: "),),
    # torch/utils/_pytree.py: register_constant() on an Enum subclass (torchao's KernelPreference, ...).
    "torch.utils._pytree": (re.compile(r"<enum '[\w.]+'> is an Enum subclass and is now natively supported by "
                                       r"torch\.compile as an opaque value type\. Calling register_constant\(\) on "
                                       r"Enum subclasses is deprecated"),),
    # onnxruntime.quantization logs these on the root logger (`logging.info`) for every tensor it leaves in
    # float, hundreds a model: the quantization step's report says what it did.
    "": (re.compile(r'Quantization parameters for tensor:"[^"]*" not specified$'),
         re.compile(r"Ignore MatMul due to non constant B: ")),
}


class _DropKnown(logging.Filter):
    def __init__(self, patterns: tuple[re.Pattern[str], ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def silence_import_noise() -> None:
    """Drop the known-harmless import messages of `KNOWN_NOISE`; call it before those libraries are
    imported (a logger's filters hold from then on, whoever configures the handlers). Idempotent."""
    for name, patterns in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(patterns))
