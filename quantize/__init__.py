"""edgellama-quantize: convert checkpoints into GGUF F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1.

    edgellama-quantize MODEL_DIR_OR_GGUF out.gguf --type q4_0      (also: python -m quantize ...)
    quantize.convert.convert_file(source, target, "q8_0")          (the same from Python)

Modules, from the user down:
    cli           argument parsing, progress bar, plan / summary / JSON report, one-line errors
    convert       open a checkpoint, plan each tensor's type, stream tensors into write_gguf
    policy        llama-quantize's rules: which tensor gets which type, fallbacks, file_type
    hf, vocab     Hugging Face folders: config.json, names, Q/K permutation, tokenizer metadata
    safetensors   validating, memory-mapped safetensors reader
    meta, pickle_reader   Meta's consolidated.*.pth through a restricted (code-free) unpickler
    gguf_source   GGUF files as input (requantizing)
    blocks        the Numba quantizers / dequantizers, byte-identical to ggml's reference C
"""
