#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora under fuzz/seeds/<target>/ (deterministic;
standard library only). Rerun after changing it and commit the result."""

import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")
ROOT = os.path.dirname(HERE)


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- safetensors ----------------------------------------------------------------------

PACK = {
    "F32": lambda v: struct.pack("<f", v),
    "F64": lambda v: struct.pack("<d", v),
    "F16": lambda v: struct.pack("<e", v),
    "BF16": lambda v: struct.pack("<f", v)[2:],
    "I64": lambda v: struct.pack("<q", int(v * 10)),
}


def safetensors(tensors, dtype="F32", metadata=None, pad_to=8):
    """tensors: [(name, shape)], values a deterministic ramp."""
    header, blobs, off = {}, [], 0
    for i, (name, shape) in enumerate(tensors):
        n = 1
        for d in shape:
            n *= d
        blob = b"".join(PACK[dtype](((i * 7 + j) % 11 - 5) / 8) for j in range(n))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    while len(h) % pad_to:
        h += b" "
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def timm(prefix="", d=2, hidden=3, grid=2, chans=1, patch=1, depth=1, classes=2, bias=True):
    t = [
        (prefix + "cls_token", [1, 1, d]),
        (prefix + "pos_embed", [1, 1 + grid * grid, d]),
        (prefix + "patch_embed.proj.weight", [d, chans, patch, patch]),
        (prefix + "patch_embed.proj.bias", [d]),
    ]
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        t += [
            (b + "norm1.weight", [d]),
            (b + "norm1.bias", [d]),
            (b + "attn.qkv.weight", [3 * d, d]),
        ]
        if bias:
            t.append((b + "attn.qkv.bias", [3 * d]))
        t += [
            (b + "attn.proj.weight", [d, d]),
            (b + "attn.proj.bias", [d]),
            (b + "norm2.weight", [d]),
            (b + "norm2.bias", [d]),
            (b + "mlp.fc1.weight", [hidden, d]),
            (b + "mlp.fc1.bias", [hidden]),
            (b + "mlp.fc2.weight", [d, hidden]),
            (b + "mlp.fc2.bias", [d]),
        ]
    t += [(prefix + "norm.weight", [d]), (prefix + "norm.bias", [d])]
    if classes:
        t += [(prefix + "head.weight", [classes, d]), (prefix + "head.bias", [classes])]
    return t


def hf(prefix="vit.", d=2, hidden=3, grid=2, classes=2):
    t = [
        (prefix + "embeddings.cls_token", [1, 1, d]),
        (prefix + "embeddings.position_embeddings", [1, 1 + grid * grid, d]),
        (prefix + "embeddings.patch_embeddings.projection.weight", [d, 1, 1, 1]),
        (prefix + "embeddings.patch_embeddings.projection.bias", [d]),
    ]
    b = prefix + "encoder.layer.0."
    for k in ["layernorm_before", "layernorm_after"]:
        t += [(b + k + ".weight", [d]), (b + k + ".bias", [d])]
    for k in ["query", "key", "value"]:
        t += [(b + f"attention.attention.{k}.weight", [d, d]), (b + f"attention.attention.{k}.bias", [d])]
    t += [
        (b + "attention.output.dense.weight", [d, d]),
        (b + "attention.output.dense.bias", [d]),
        (b + "intermediate.dense.weight", [hidden, d]),
        (b + "intermediate.dense.bias", [hidden]),
        (b + "output.dense.weight", [d, hidden]),
        (b + "output.dense.bias", [d]),
        (prefix + "layernorm.weight", [d]),
        (prefix + "layernorm.bias", [d]),
    ]
    if classes:
        t += [("classifier.weight", [classes, d]), ("classifier.bias", [classes])]
    return t


def mmcls(d=2, hidden=3, grid=2):
    p = "backbone."
    t = [
        (p + "cls_token", [1, 1, d]),
        (p + "pos_embed", [1, 1 + grid * grid, d]),
        (p + "patch_embed.projection.weight", [d, 1, 1, 1]),
        (p + "patch_embed.projection.bias", [d]),
    ]
    b = p + "layers.0."
    t += [
        (b + "ln1.weight", [d]),
        (b + "ln1.bias", [d]),
        (b + "attn.qkv.weight", [3 * d, d]),
        (b + "attn.qkv.bias", [3 * d]),
        (b + "attn.proj.weight", [d, d]),
        (b + "attn.proj.bias", [d]),
        (b + "ln2.weight", [d]),
        (b + "ln2.bias", [d]),
        (b + "ffn.layers.0.0.weight", [hidden, d]),
        (b + "ffn.layers.0.0.bias", [hidden]),
        (b + "ffn.layers.1.weight", [d, hidden]),
        (b + "ffn.layers.1.bias", [d]),
        (p + "ln1.weight", [d]),
        (p + "ln1.bias", [d]),
        ("head.layers.head.weight", [2, d]),
        ("head.layers.head.bias", [2]),
    ]
    return t


def safetensors_seeds():
    write("safetensors", "timm_f32", safetensors(timm()))
    write("safetensors", "timm_f64_depth2_nobias", safetensors(timm(depth=2, bias=False, classes=0), "F64"))
    write("safetensors", "timm_patch2_chans3", safetensors(timm(d=2, hidden=1, patch=2, chans=3, grid=1, classes=0), "BF16"))
    write("safetensors", "timm_prefixed_unaligned", safetensors(timm(prefix="model."), pad_to=2))
    write("safetensors", "hf_f16", safetensors(hf(), "F16"))
    write("safetensors", "hf_model_bf16", safetensors(hf(prefix="", classes=0), "BF16"))
    write("safetensors", "mmcls_bf16", safetensors(mmcls(), "BF16"))
    write("safetensors", "int_tensor", safetensors([("x", [2, 2])], "I64"))
    write("safetensors", "metadata", safetensors([("ept.prompts", [1, 2, 2])], metadata={"peft": "{\"method\":\"ept\"}"}))
    write("safetensors", "empty_header", struct.pack("<Q", 2) + b"{}")


# ---- IR text --------------------------------------------------------------------------

IR_SMALL = """eptc-ir 1 "small"
%0 = input "x" : f32[B,2,3]
%1 = param "w" frozen checkpoint : f32[4,3]
%2 = param "b" trainable normal(0.02) : f32[4] @ept
%3 = matmul %0, %1 transpose_b : f32[B,2,4]
%4 = add %3, %2 : f32[B,2,4]
%5 = softmax %4 axis=2 : f32[B,2,4]
%6 = reduce_sum %5 axes=[1] keepdim : f32[B,1,4]
%7 = const [0.5,-1.0,inf] : f32[3]
output "y" = %6
"""

IR_SHAPES = """eptc-ir 1 "shapes"
# comment
%0 = input "x" : f32[B,2,4,4]
%1 = patchify %0 patch=2 : f32[B,4,8]
%2 = permute %1 perm=[0,2,1] : f32[B,8,4]
%3 = slice %2 axis=1 start=0 end=2 : f32[B,2,4]
%4 = concat %3, %3 axis=1 : f32[B,4,4]
%5 = reshape %4 : f32[B,16]
%6 = param "g" frozen ones : f32[16]
%7 = param "h" frozen zeros : f32[16]
%8 = layernorm %5, %6, %7 eps=1e-6 : f32[B,16]
%9 = gelu %8 : f32[B,16]
output "z" = %9
"""


def ir_seeds():
    d = os.path.join(ROOT, "ir-specs", "examples")
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb") as fh:
            write("ir_text", "spec_" + f.replace(".eptc", ""), fh.read())
    write("ir_text", "small", IR_SMALL)
    write("ir_text", "shapes", IR_SHAPES)
    write("ir_text", "header_only", 'eptc-ir 1 "empty"\n')


# ---- annotations ----------------------------------------------------------------------


def ann(multiclass, classes, text):
    return bytes([1 if multiclass else 0, classes]) + text.encode()


def annotation_seeds():
    write("annotations", "multilabel_comma", ann(False, 3, "a.png 1,0,1\nb c.png 0,0,0\r\n\n  d.png 1,1,1  \n"))
    write("annotations", "multilabel_space", ann(False, 3, "a.png 1 0 1\nimg 12.png 0 1 0\n"))
    write("annotations", "multiclass", ann(True, 5, "a.png 3\nmy file 7.png 0\nx 2 4\n"))
    write("annotations", "unlabeled", ann(True, 2, "a.png\nb with space.png\n"))
    write("annotations", "errors", ann(True, 2, "a.png 1,0\nb.png 9\nc.png -1\n"))


# ---- plugin compile -------------------------------------------------------------------


def desc(name, dtype, shape, data):
    out = bytes([dtype, len(shape), len(name)]) + name.encode()
    for d in shape:
        out += bytes([d]) if d < 255 else b"\xff" + struct.pack("<Q", d)
    return out + struct.pack("<H", len(data)) + data


PLUGIN_IR = """eptc-ir 1 "mlp"
%0 = input "x" : f32[B,3]
%1 = param "w" frozen checkpoint : f32[2,3]
%2 = param "b" frozen checkpoint : f32[2]
%3 = matmul %0, %1 transpose_b : f32[B,2]
%4 = add %3, %2 : f32[B,2]
output "y" = %4
"""


def plugin_seeds():
    f32 = lambda n: b"".join(struct.pack("<f", i / 4) for i in range(n))
    f16 = lambda n: b"".join(struct.pack("<e", i / 4) for i in range(n))
    w = desc("w", 0, [2, 3], f32(6)) + desc("b", 0, [2], f32(2))
    write("plugin_compile", "mlp_f32", PLUGIN_IR.encode() + b"\0" + w)
    write("plugin_compile", "mlp_f16_bf16", PLUGIN_IR.encode() + b"\0" + desc("w", 1, [2, 3], f16(6)) + desc("b", 2, [2], b"\0\x3f" * 2))
    write("plugin_compile", "mlp_no_weights", PLUGIN_IR.encode())
    write("plugin_compile", "big_dim", PLUGIN_IR.encode() + b"\0" + desc("w", 0, [2**40, 2**30], b""))
    write("plugin_compile", "scalar", PLUGIN_IR.encode() + b"\0" + desc("s", 0, [], f32(1)))


if __name__ == "__main__":
    shutil.rmtree(SEEDS, ignore_errors=True)
    safetensors_seeds()
    ir_seeds()
    annotation_seeds()
    plugin_seeds()
