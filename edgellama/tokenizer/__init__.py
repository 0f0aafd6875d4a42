"""Text <-> token ids, with the same ids as llama.cpp.

Three vocabularies are supported:

* GGUF ``tokenizer.ggml.model = "gpt2"``: byte-level BPE (SmolLM, Llama 3, Qwen2, ...): llama.cpp's
  pre-tokenizer for the file's ``tokenizer.ggml.pre`` (``pretokenize``), then the merges
  (``bpe``, over the rank table of ``merge``).
* GGUF ``tokenizer.ggml.model = "llama"``: SentencePiece BPE as llama.cpp runs it (``spm``).
* A tiktoken ``tokenizer.model`` file (Llama 3) or a SentencePiece ``.model``, loaded with
  ``Tokenizer.from_file`` (``files``).

Special tokens follow llama.cpp (``vocab``): control (and unknown) tokens are matched in the text
only with ``special=True`` (and, given ``plain_spans``, only outside them); user-defined tokens
always are; longer special tokens are matched first.  Decoding omits control tokens unless
``special=True``; ``StreamDecoder`` (``stream``) never yields half a UTF-8 character.
End-of-generation ids are chosen by llama.cpp's rules (eos, eot, eom, the FIM pad/repo/sep tokens
and a list of well-known token texts).

Rooms: ``vocab`` (token types, limits, metadata access, llama.cpp's special-token rules),
``pretokenize`` (the regex table), ``bpe``, ``merge``, ``spm``, ``files``, ``stream``, ``kept`` (a BPE
tokenizer's tables kept between loads of one model file), and ``tokenizer`` (the ``Tokenizer``
facade that puts them together).  Every problem with the metadata raises
``TokenizerError`` naming the source and the key.
"""

from .bpe import MERGE_CHUNK, gpt2_byte_chars
from .files import llama3_special_tokens, read_sentencepiece, spm_model_to_metadata
from .stream import StreamDecoder
from .tokenizer import Tokenizer
from .vocab import MAX_INPUT_CHARS, MAX_MERGES, MAX_MERGES_PER_TOKEN, MAX_VOCAB, TokenizerError

_gpt2_byte_chars = gpt2_byte_chars  # the name tools/make_hf_checkpoint.py imports

__all__ = ["Tokenizer", "TokenizerError", "StreamDecoder", "spm_model_to_metadata", "read_sentencepiece",
           "llama3_special_tokens", "gpt2_byte_chars", "MAX_INPUT_CHARS", "MAX_VOCAB", "MAX_MERGES",
           "MAX_MERGES_PER_TOKEN", "MERGE_CHUNK"]
