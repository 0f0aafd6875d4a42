"""Tokenizer files -> GGUF tokenizer metadata, as llama.cpp's convert_hf_to_gguf.py writes it.

Two sources:
  * ``tokenizer.json`` (Hugging Face "fast" tokenizer) with a byte-level BPE model ->
    ``tokenizer.ggml.model = "gpt2"``: tokens by id, token types, merges, pre-tokenizer name;
  * ``tokenizer.model`` (SentencePiece protobuf) -> ``tokenizer.ggml.model = "llama"``: tokens,
    scores, token types.  The protobuf is read by the runtime's reader
    (``edgellama.tokenizer.read_sentencepiece``: bounds-checked, no sentencepiece package).
Both add the special token ids, ``add_bos_token`` / ``add_eos_token`` and the chat template(s)
from ``tokenizer_config.json`` (or ``chat_template.jinja``), falling back to ``config.json`` ids.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgellama._validate import is_int
from edgellama.chat import MAX_TEMPLATE_CHARS, ChatTemplateError, check_template
from edgellama.gguf import ModelFormatError, ValueType
from edgellama.tokenizer import TokenizerError, read_sentencepiece
from edgellama.tokenizer.files import MAX_TOKENIZER_FILE_BYTES, SentencePieceModel

from .files import read_folder_file
from .safetensors import json_items_bound, no_duplicate_keys
from .source import QuantizeError, show

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MAX_JSON_BYTES = 256 * 1024 * 1024
# values a JSON file may hold (Llama 3's tokenizer.json: 0.4-1 million; counted before parsing,
# which allocates tens of bytes per value)
MAX_JSON_ITEMS = 1 << 22
# [PAD<i>] entries written where the embedding has more rows than the tokenizer has tokens (real
# models pad a few hundred rows at most); a larger gap is a vocabulary that is not this model's.
MAX_VOCAB_PADDING = 1 << 16
# special token kind -> GGUF key (llama.cpp's spellings, "seperator" included)
SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
                "pad": "tokenizer.ggml.padding_token_id", "cls": "tokenizer.ggml.cls_token_id",
                "mask": "tokenizer.ggml.mask_token_id"}


def read_json(path: Path, what: str = "") -> Any:
    """A JSON file, size-capped, with duplicate keys refused; errors name the file."""
    try:
        raw = read_folder_file(path, MAX_JSON_BYTES, f"{what or 'JSON'} file")
        items = json_items_bound(raw)
        if items > MAX_JSON_ITEMS:
            raise ModelFormatError(f"{path}: holds up to {items} JSON values, more than the {MAX_JSON_ITEMS} "
                                   f"accepted in a {what or 'JSON'} file (MAX_JSON_ITEMS)")
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        if isinstance(e, ModelFormatError):
            raise
        raise ModelFormatError(f"{path}: not valid JSON: {e}") from None


# ----- byte-level BPE from tokenizer.json --------------------------------------------------------

def bpe_vocab(folder: Path, vocab_size: int) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    tok = read_json(path, "tokenizer.json")
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise QuantizeError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE only; "
                            "SentencePiece models need tokenizer.model)")
    if model.get("byte_fallback") or any(p.get("type") == "Metaspace" for p in _pre_parts(tok)):
        raise QuantizeError(f"{path}: a SentencePiece-style BPE (byte_fallback / Metaspace); its "
                            "tokenizer.model is needed (put it in the folder)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and is_int(v) for k, v in vocab.items()):
        raise ModelFormatError(f"{path}: model.vocab must map strings to integer ids")
    added = tok.get("added_tokens") or []
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and is_int(a.get("id")) and isinstance(a.get("content"), str) for a in added):
        raise ModelFormatError(f"{path}: added_tokens must be a list of {{id, content}} objects")

    by_id: dict[int, str] = {}
    for text, i in vocab.items():
        _put_token(by_id, i, text, path, vocab_size)
    added_by_id = {a["id"]: a for a in added}
    for i, a in added_by_id.items():
        if by_id.get(i, a["content"]) != a["content"]:
            raise ModelFormatError(f"{path}: added token {show(a['content'])} reuses id {i} of {show(by_id[i])}")
        _put_token(by_id, i, a["content"], path, vocab_size, allow_same=True)
    check_padding(path, len(by_id), vocab_size)

    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added_by_id:
            special = bool(added_by_id[i].get("special")) or _looks_special(by_id[i])
            tokens.append(by_id[i])
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    config = _tokenizer_config(folder)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(tok, config, path),
        "tokenizer.ggml.tokens": (ValueType.ARRAY, (ValueType.STRING, tokens)),
        "tokenizer.ggml.token_type": (ValueType.ARRAY, (ValueType.INT32, np.array(types, np.int32))),
        "tokenizer.ggml.merges": (ValueType.ARRAY, (ValueType.STRING, _merges(model, path))),
    }
    meta.update(_special_tokens(folder, config, tokens, tok))
    byte_level = [p for p in _pre_parts(tok) if p.get("type") == "ByteLevel"]
    if byte_level:
        meta["tokenizer.ggml.add_space_prefix"] = bool(byte_level[0].get("add_prefix_space", False))
    return meta


def check_padding(path: Path, n_tokens: int, vocab_size: int) -> None:
    """The embedding's rows beyond the tokenizer's tokens become [PAD] entries: at most MAX_VOCAB_PADDING."""
    if vocab_size - n_tokens > MAX_VOCAB_PADDING:
        raise ModelFormatError(f"{path}: defines {n_tokens} tokens, but vocab_size {vocab_size} (the rows of the "
                               f"embedding) would add {vocab_size - n_tokens} [PAD] entries (limit "
                               f"MAX_VOCAB_PADDING = {MAX_VOCAB_PADDING})")


def _put_token(by_id: dict[int, str], i: int, text: str, path: Path, vocab_size: int,
               allow_same: bool = False) -> None:
    if not 0 <= i < vocab_size:
        raise ModelFormatError(f"{path}: token {show(text)} has id {show(i)}, outside the vocabulary of "
                               f"{vocab_size} (config.json vocab_size)")
    if i in by_id and not (allow_same and by_id[i] == text):
        raise ModelFormatError(f"{path}: id {i} is used by both {show(by_id[i])} and {show(text)}")
    by_id[i] = text


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: <|...|>, <｜...｜> and a few known names."""
    return ((token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))
            or token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"))


def _merges(model: dict, path: Path) -> list[str]:
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise ModelFormatError(f"{path}: model.merges must be a list")
    out = []
    for m in merges:
        if isinstance(m, str) and m.count(" ") >= 1:
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append(f"{m[0]} {m[1]}")  # newer tokenizers store pairs; GGUF wants "a b"
        else:
            raise ModelFormatError(f"{path}: merge #{len(out)} {show(m)} is neither 'a b' nor [a, b]")
    return out


def _pre_parts(tok: dict) -> list[dict]:
    pre = tok.get("pre_tokenizer") or {}
    if not isinstance(pre, dict):
        return []
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _pre_tokenizer_name(tok: dict, config: dict, path: Path) -> str:
    """llama.cpp picks the pre-tokenizer by hashing the HF tokenizer's output; without transformers
    we recognise the pre_tokenizer structures of the common families."""
    parts = _pre_parts(tok)
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm" if config.get("clean_up_tokenization_spaces") is False else "starcoder"
    if kinds == ["Split", "ByteLevel"]:
        pattern = parts[0].get("pattern")
        pattern = str(pattern.get("Regex", "")) if isinstance(pattern, dict) else ""
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if r"\p{N}" in pattern:
            return "qwen2"
    warnings.warn(f"{path}: unrecognised pre-tokenizer {show(kinds)}; writing tokenizer.ggml.pre = 'default'")
    return "default"


# ----- SentencePiece tokenizer.model -------------------------------------------------------------

def spm_vocab(folder: Path, vocab_size: int) -> dict[str, Any]:
    path = folder / "tokenizer.model"
    model = parse_sentencepiece(path, max_pieces=vocab_size)
    trainer, normalizer = model.trainer, model.normalizer
    check_padding(path, len(model.pieces), vocab_size)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = np.full(vocab_size, -1000.0, dtype=np.float32)
    types = np.full(vocab_size, UNUSED, dtype=np.int32)
    for i, (piece, score, kind) in enumerate(model.pieces):
        tokens[i], scores[i], types[i] = piece, score, kind
    config = _tokenizer_config(folder)
    _apply_added_tokens(folder, config, tokens, scores, types)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": (ValueType.ARRAY, (ValueType.STRING, tokens)),
        "tokenizer.ggml.scores": (ValueType.ARRAY, (ValueType.FLOAT32, scores)),
        "tokenizer.ggml.token_type": (ValueType.ARRAY, (ValueType.INT32, types)),
    }
    defaults = {"unk": trainer.get(40, 0), "bos": trainer.get(41, 1), "eos": trainer.get(42, 2),
                "pad": trainer.get(43, -1)}
    meta.update(_special_tokens(folder, config, tokens, None, defaults, default_add_bos=True))
    meta["tokenizer.ggml.add_space_prefix"] = bool(normalizer.get(3, 1))
    return meta


def _apply_added_tokens(folder: Path, config: dict, tokens: list[str], scores: np.ndarray,
                        types: np.ndarray) -> None:
    """added_tokens.json, then tokenizer_config's added_tokens_decoder, as convert_hf_to_gguf does:
    they replace the pieces at their ids (score -1000, CONTROL if special, else USER_DEFINED)."""
    added: list[tuple[int, str, int]] = []
    added_json = folder / "added_tokens.json"
    if added_json.exists():
        added += [(i, text, USER_DEFINED) for text, i in _str_int_map(read_json(added_json), added_json).items()]
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must be an object")
    for key, entry in decoder.items():
        if not (re.fullmatch(r"[0-9]{1,10}", key) and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: bad added_tokens_decoder entry {show(key)}")
        text = entry["content"]
        if entry.get("special") or _looks_special(text):
            added.append((int(key), text, CONTROL))
        else:
            added.append((int(key), text.replace("\u2581", " "), USER_DEFINED))
    for i, text, kind in added:
        if not 0 <= i < len(tokens):
            warnings.warn(f"{folder}: ignoring added token {show(text)}: id {i} is outside the vocabulary of {len(tokens)}")
            continue
        tokens[i], scores[i], types[i] = text, -1000.0, kind


def _str_int_map(value: Any, path: Path) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and is_int(v) for k, v in value.items()):
        raise ModelFormatError(f"{path}: expected an object mapping strings to integer ids")
    return value


def parse_sentencepiece(path: Path, max_pieces: int | None = None) -> SentencePieceModel:
    """``path``'s SentencePiece model (pieces as (text, score, llama.cpp token type), trainer_spec and
    normalizer_spec ints), read by the runtime's reader.  A file larger than MAX_TOKENIZER_FILE_BYTES
    is refused before it is read, and reading stops at the first piece beyond ``max_pieces`` (the
    embedding's rows); every refusal is a ModelFormatError naming the file."""
    data = read_folder_file(path, MAX_TOKENIZER_FILE_BYTES, "SentencePiece model")
    try:
        return read_sentencepiece(data, str(path), max_pieces=max_pieces)
    except TokenizerError as e:
        raise ModelFormatError(str(e)) from None


# ----- special tokens, add_bos, chat template ----------------------------------------------------

def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return {}
    config = read_json(path, "tokenizer_config.json")
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return config


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]  # AddedToken serialized as a dict
    return None


def _special_tokens(folder: Path, config: dict, tokens: list[str], tok_json: dict | None,
                    defaults: dict[str, int] | None = None, default_add_bos: bool | None = None) -> dict[str, Any]:
    config_path = folder / "config.json"
    model_config = read_json(config_path) if config_path.exists() else {}
    if not isinstance(model_config, dict):
        raise ModelFormatError(f"{config_path}: expected a JSON object")
    index = {t: i for i, t in enumerate(tokens)}
    meta: dict[str, Any] = {}
    for kind, key in SPECIAL_KEYS.items():
        token_id = None
        text = _token_text(config.get(f"{kind}_token"))
        if text is not None and text in index:
            token_id = index[text]
        if token_id is None:
            value = model_config.get(f"{kind}_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if is_int(value):
                token_id = value
        if token_id is None and defaults is not None:
            token_id = defaults.get(kind)
        if token_id is None or token_id < 0:
            continue
        if token_id >= len(tokens):
            raise ModelFormatError(f"{folder}: {kind} token id {show(token_id)} is outside the vocabulary of "
                                   f"{len(tokens)}")
        meta[key] = (ValueType.UINT32, token_id)
    for kind, default in (("bos", default_add_bos), ("eos", None)):
        value = config.get(f"add_{kind}_token")
        if value is None and tok_json is not None:
            value = _post_processor_adds(tok_json, kind, tokens, meta)
        if value is None:
            value = default
        if isinstance(value, bool):
            meta[f"tokenizer.ggml.add_{kind}_token"] = (ValueType.BOOL, value)
    meta.update(chat_templates(folder, config))
    return meta


def _post_processor_adds(tok_json: dict, kind: str, tokens: list[str], meta: dict) -> bool | None:
    """A TemplateProcessing post-processor tells whether BOS / EOS is added around a sequence."""
    post = tok_json.get("post_processor")
    if not isinstance(post, dict):
        return None
    steps = post.get("processors") if post.get("type") == "Sequence" else [post]
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            single = step.get("single")
            single = single if isinstance(single, list) else []
            ids = [p["SpecialToken"].get("id") for p in single
                   if isinstance(p, dict) and isinstance(p.get("SpecialToken"), dict)]
            key = SPECIAL_KEYS[kind]
            if key not in meta:
                return None
            special = tokens[meta[key][1]]
            position = 0 if kind == "bos" else -1
            return bool(ids) and ids[position] == special
    return None


def chat_templates(folder: Path, config: dict) -> dict[str, Any]:
    """tokenizer.chat_template (and named ones) from chat_template.jinja or tokenizer_config.json,
    each checked as the runtime will: one longer than it accepts is refused, one that does not
    compile is written (llama.cpp copies templates as they are) with a warning."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        try:
            text = read_folder_file(jinja, 4 * MAX_TEMPLATE_CHARS, "chat template", contained=True).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{jinja}: not valid UTF-8") from None
        out = {"tokenizer.chat_template": text}
        source = jinja
    else:
        out = _config_templates(folder, config)
        source = folder / "tokenizer_config.json"
    for key, value in out.items():
        if isinstance(value, str):
            _check_template(source, key, value)
    return out


def _check_template(source: Path, key: str, template: str) -> None:
    name = "the chat template" if key == "tokenizer.chat_template" else f"chat template {key[24:]!r:.80}"
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ModelFormatError(f"{source}: {name} is {len(template)} characters, more than the {MAX_TEMPLATE_CHARS} "
                               "the runtime accepts (edgellama.chat.MAX_TEMPLATE_CHARS); remove it to convert")
    try:
        check_template(template)
    except ChatTemplateError as e:
        warnings.warn(f"{source}: {name} is written as it is, but the runtime will refuse it ({e}): "
                      "chat needs a template given at run time")


def _config_templates(folder: Path, config: dict) -> dict[str, Any]:
    template = config.get("chat_template")
    if template is None:
        return {}
    if isinstance(template, str):
        return {"tokenizer.chat_template": template}
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                          and isinstance(t.get("template"), str) for t in template):
        out: dict[str, Any] = {}
        names = []
        for t in template:
            if not t["name"] or t["name"] in names or (t["name"] == "default" and "tokenizer.chat_template" in out):
                raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: chat template name {t['name']!r:.80} "
                                       "is empty or given twice")
            if t["name"] == "default":
                out["tokenizer.chat_template"] = t["template"]
            else:
                out[f"tokenizer.chat_template.{t['name']}"] = t["template"]
                names.append(t["name"])
        if names:
            out["tokenizer.chat_templates"] = (ValueType.ARRAY, (ValueType.STRING, names))
        return out
    raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a "
                           "list of {name, template}")
