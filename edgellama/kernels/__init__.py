"""Every Numba kernel of the runtime, one room per job.  Each kernel has a numpy twin in the tests.

Quantized weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) arrive as the row-interleaved copy
``pack_rows`` makes once at load (the file's bytes, reordered: still quantized, never expanded to
floats, about the file's size); float weights as read-only ``(n_out, row_bytes)`` uint8 views of
the memory-mapped GGUF file; both with their ggml type id.  Each activation row is quantized once
to int8 blocks of 32 (ggml's Q8_0 / Q8_1 activation format) and reused by every matrix that reads
it; a block's exact integer dot product is scaled once.  One token goes through ``matvec_packed``
(one-token tiles, inside the fused ``decode_token``), a prompt through ``matmul_packed`` (tiles of
several tokens); both compute every row exactly as the other does.

Rooms:

* ``target``    the CPU the kernels compile for (Numba's rule) and the packed layout it implies;
* ``llvm``      LLVM IR helpers and scalar intrinsics (half <-> float, ``_expf``);
* ``parallel``  ``parallel_rows``: a loop over row ranges on Numba's threads (compiled once, unlike prange);
* ``layout``    the packed layout, ``pack_rows``, and the values every runtime type's bytes hold;
* ``products``  activation quantization, the int8 tiles (compiled for a compile-time set of packed
                types, ``Formats``: a model's own), float products, the per-type dispatch;
* ``kv``        KV cache element formats (f32, f16, q8_0), storing and re-rotating rows;
* ``ops``       RMSNorm, RoPE, SwiGLU;
* ``attention`` prompt and one-token grouped-query attention;
* ``lanes``     a prompt's attention with its queries in vector lanes (scores, softmax, values);
* ``decode``    the fused decode step and its argument bundles (named weight slots);
* ``batch``     several sequences' tokens in one step (slots of KV cache, rows computed as decode does);
* ``cache``     Numba's cache: one stamp over the whole package, lean loading.

Importing this package compiles nothing: each kernel compiles (or loads from Numba's cache) on its
first call.
"""

from . import attention as _attention_room, batch as _batch_room, decode as _decode_room, kv as _kv_room
from . import layout as _layout_room
from . import llvm as _llvm_room, ops as _ops_room, products as _products_room
from .attention import ATTN_SPAN, attention, attention_one, prompt_work_size
from .batch import (BatchBuffers, BatchRows, SlotCache, attention_jobs, attention_rows, forward_rows, matmul_rows,
                    store_rows)
from .cache import install as _install_cache
from .common import BF16_TABLE, F16_TABLE, QK, SUPER_BLOCK, T_BF16, T_F16, T_F32, T_Q4_0, T_Q4_1, T_Q4_K, \
    T_Q5_0, T_Q5_1, T_Q5_K, T_Q6_K, T_Q8_0
from .decode import (ATTN_K, ATTN_OUTPUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_GATE, FFN_UP, LAYER_MATRICES,
                     MAT_OFFSET, MAT_OUT, MAT_ROW_BYTES, MAT_ROWS, MAT_TYPE, N_LAYER_MATRICES, DecodeBuffers, DecodeWeights, Dims, HalfTables, KVCache,
                     RopeTables, decode_token)
from .kv import kv_row_length, rerotate_keys, store_kv
from .layout import (PACKED_FORMATS, dequantize_packed_row, dequantize_row, dequantize_rows, embed_row,
                     embed_rows, group_bytes, is_k_quant, is_quantized, pack_rows, pack_rows_decoded,
                     pack_rows_moved, record_bytes, super_block_bytes,
                     unpack_block)
from .ops import rmsnorm, rmsnorm_rows, rope, rope_rows, swiglu
from .products import (ALL_FORMATS, Activation, Formats, activation_forms_of, activation_room, Q8Activation, matmul_packed, matvec, matvec_f32,
                       matvec_half, matvec_packed, quantize_activation, quantize_activation_rows, quantize_q8,
                       quantize_q8_rows, quantize_q8k, quantize_q8k_rows, round_to_f16)
from .target import packing, target_summary, tile_tokens
from ..memory import release_compiler_pages as _release_compiler_pages
from ..quants import F16_LOAD_WIDTH

HALF_TABLES = HalfTables(F16_TABLE, BF16_TABLE)

_install_cache([_attention_room, _batch_room, _decode_room, _kv_room, _layout_room, _llvm_room, _ops_room,
                _products_room])
_release_compiler_pages()  # what importing Numba touched of LLVM (its static initializers)
