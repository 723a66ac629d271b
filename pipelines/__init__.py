"""Quill: train a small language model end to end on the Hugging Face stack (see README.md)."""

import logging

# bitsandbytes 0.50 logs a warning at import on CPUs with AVX512-BF16 when it cannot fetch an optional 4-bit kernel
# from the Hub (`kernels-community`), which no offline run can; peft imports it whenever it is installed, so every
# stage's stderr would carry that line before its one-line error. 4-bit loading itself is unaffected.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
