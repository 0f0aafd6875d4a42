"""What every kernel module shares: compile options, ggml type ids (from THE table in
edgellama.quants) and the 16-bit float tables."""

from __future__ import annotations

import numpy as np

from ..quants import QK, SUPER_BLOCK, GGMLType  # noqa: F401  (re-exported to the kernel modules)

T_F32, T_F16, T_BF16 = int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)
T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1 = int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q5_0), int(GGMLType.Q5_1)
T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K = int(GGMLType.Q8_0), int(GGMLType.Q4_K), int(GGMLType.Q5_K), int(GGMLType.Q6_K)
I32 = np.int32

# ``half_table`` arguments are 65536-entry float32 tables mapping a 16-bit pattern to its value
with np.errstate(invalid="ignore"):  # arm64 numpy flags the signalling-NaN patterns while widening
    F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TABLE = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)

# error_model="numpy": a division is a plain instruction (no ZeroDivisionError check), so loops with
# divisions vectorize; fastmath only for kernels whose floating work is dot products
FAST = {"cache": True, "fastmath": True, "error_model": "numpy"}
EXACT = {"cache": True, "error_model": "numpy"}
