"""Builds the tiny image classifier the Rust tests use, and its reference values.

Writes, next to this file:

  tiny-cnn.onnx                   input "input" float32 [N,3,32,32] (NCHW) ->
                                  Conv 3x3 (8 filters, pad 1) -> Relu ->
                                  GlobalAveragePool -> Flatten -> Gemm ->
                                  output "logits" float32 [N,5]. Weights are
                                  drawn from numpy's default_rng(SEED); see
                                  build_model for the fc bias.
  tiny-cnn.labels.txt             the 5 class labels, one per line, in logit order
  images/*.png                    3 test images of different sizes and PNG colour
                                  types, drawn with numpy
  tiny-cnn-reference.json         the preprocessing, and per image the top-3
                                  labels with softmax scores (ONNX Runtime)
  tiny-cnn-tensor-request.json    a KServe v2 inference request body with the
  tiny-cnn-tensor-response.json   preprocessed first image, and its response

Preprocessing (what the Rust side does with the `image` crate):

  decode the PNG, convert to 8-bit RGB (alpha dropped, grey replicated);
  resize so that the shorter side is 36 and the longer side is
  round(longer * 36 / shorter), with image::imageops::resize and
  FilterType::Triangle (bilinear); crop the centre 32x32, the offset of each
  axis being floor((side - 32) / 2); x / 255, then (x - mean) / std per
  channel; NCHW float32.

The resize here is a port of image 0.25's imageops::resize with
FilterType::Triangle (a vertical pass to f32, then a horizontal pass rounded
to u8), so the Rust preprocessing should match the reference tensor exactly;
Pillow's bilinear resize, which rounds to u8 between its two passes, is
computed too and the reference records how far apart the two are.

Run with the venv python that scripts/fetch-models.sh set up:

  .venv/bin/python tests/models/make_cnn.py [--check]

--check regenerates everything in memory and compares it with the files
instead of writing them.
"""

import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

SEED = 366
LABELS = ["apple", "banana", "cherry", "grape", "lemon"]
FILTERS = 8
RESIZE_SHORTER = 36
CROP = 32
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
# The top-3 of each test image must be separated by at least this much in
# logits, so that small differences in preprocessing cannot reorder them.
MIN_LOGIT_GAP = 0.45


# ----------------------------------------------------------------- the model
def conv_features(x: np.ndarray, w1: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Conv 3x3 (pad 1) -> Relu -> global average, in float64: [N,3,32,32] -> [N,F]."""
    x = x.astype(np.float64)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], w1.shape[0], x.shape[2], x.shape[3]))
    for dy in range(3):
        for dx in range(3):
            window = xp[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
            out += np.einsum("nchw,fc->nfhw", window, w1[:, :, dy, dx].astype(np.float64))
    out += b1.astype(np.float64)[None, :, None, None]
    return np.maximum(out, 0.0).mean(axis=(2, 3))


def build_model(test_tensors: np.ndarray) -> onnx.ModelProto:
    """Conv and fc weights are drawn from default_rng(SEED); the fc bias
    subtracts the mean feature vector of the test images, so that they are
    told apart by what differs between them rather than sharing one winner.
    SEED is the seed in 1..399 that gives the three test images three
    different top classes, top scores below 0.9, third scores above 0.03
    and the widest smallest gap between their top-4 logits (0.498)."""
    rng = np.random.default_rng(SEED)
    w1 = rng.normal(0.0, 0.4, size=(FILTERS, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0.0, 0.1, size=(FILTERS,)).astype(np.float32)
    w2 = rng.normal(0.0, 3.0, size=(len(LABELS), FILTERS)).astype(np.float32)
    mean_features = conv_features(test_tensors, w1, b1).mean(axis=0)
    b2 = np.round(-(w2.astype(np.float64) @ mean_features), 4).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["features"], name="flatten", axis=1),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc",
                         alpha=1.0, beta=1.0, transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializer=[
            numpy_helper.from_array(w1, "conv.weight"),
            numpy_helper.from_array(b1, "conv.bias"),
            numpy_helper.from_array(w2, "fc.weight"),
            numpy_helper.from_array(b2, "fc.bias"),
        ],
    )
    model = helper.make_model(graph, producer_name="warren tests/models/make_cnn.py",
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model.doc_string = (f"Tiny test classifier with weights from numpy default_rng({SEED}); "
                        "labels in tiny-cnn.labels.txt")
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------- the images
def make_images() -> dict[str, Image.Image]:
    """Three deterministic images: sizes that exercise both resize axes and a
    square downscale, and the RGB, RGBA and greyscale PNG colour types."""
    # 40x48 (w x h) RGB: red rises left to right, green top to bottom, blue diagonal stripes.
    h, w = 48, 40
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.where((x + y) % 8 < 3, 230, 20)], axis=-1)
    gradient = Image.fromarray(rgb.astype(np.uint8), "RGB")

    # 48x40 RGBA: orange and teal 6-pixel checkerboard; alpha varies and is dropped.
    h, w = 40, 48
    y, x = np.mgrid[0:h, 0:w]
    check = ((x // 6) + (y // 6)) % 2 == 0
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[check] = [250, 140, 30, 255]
    rgba[~check] = [20, 150, 160, 255]
    rgba[..., 3] = (255 - x * 3).astype(np.uint8)
    checker = Image.fromarray(rgba, "RGBA")

    # 64x64 greyscale: concentric rings.
    h, w = 64, 64
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot(x - 31.5, y - 31.5)
    grey = (127.5 + 127.5 * np.cos(r / 2.5)).round().astype(np.uint8)
    rings = Image.fromarray(grey, "L")

    return {"gradient-40x48-rgb.png": gradient, "checker-48x40-rgba.png": checker, "rings-64x64-gray.png": rings}


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


# ----------------------------------------------------------- preprocessing
def _round_away(x: np.ndarray) -> np.ndarray:
    """f32::round (half away from zero) of non-negative values, exactly."""
    return np.floor(x.astype(np.float64) + 0.5)


def _weights(src: int, dst: int) -> list[tuple[int, np.ndarray]]:
    """image 0.25 imageops::sample's window and normalised triangle weights, in f32."""
    f32 = np.float32
    ratio = f32(src) / f32(dst)
    sratio = ratio if ratio >= f32(1.0) else f32(1.0)
    support = f32(1.0) * sratio
    out = []
    for o in range(dst):
        center = (f32(o) + f32(0.5)) * ratio
        left = min(max(int(np.floor(center - support)), 0), src - 1)
        right = min(max(int(np.ceil(center + support)), left + 1), src)
        center = center - f32(0.5)
        ws = []
        total = f32(0.0)
        for i in range(left, right):
            t = abs((f32(i) - center) / sratio)
            wgt = f32(1.0) - t if t < f32(1.0) else f32(0.0)
            ws.append(wgt)
            total = f32(total + wgt)
        out.append((left, np.array([f32(wgt / total) for wgt in ws], dtype=np.float32)))
    return out


def resize_triangle(rgb: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """image::imageops::resize(img, new_w, new_h, FilterType::Triangle) of image 0.25."""
    h, w, _ = rgb.shape
    if (new_w, new_h) == (w, h):
        return rgb.copy()
    src = rgb.astype(np.float32)
    tmp = np.zeros((new_h, w, 3), dtype=np.float32)  # vertical pass, kept in f32
    for oy, (left, ws) in enumerate(_weights(h, new_h)):
        acc = np.zeros((w, 3), dtype=np.float32)
        for i, wgt in enumerate(ws):
            acc = acc + src[left + i] * wgt
        tmp[oy] = acc
    out = np.zeros((new_h, new_w, 3), dtype=np.uint8)  # horizontal pass, rounded to u8
    for ox, (left, ws) in enumerate(_weights(w, new_w)):
        acc = np.zeros((new_h, 3), dtype=np.float32)
        for i, wgt in enumerate(ws):
            acc = acc + tmp[:, left + i] * wgt
        out[:, ox] = _round_away(np.clip(acc, 0.0, 255.0)).astype(np.uint8)
    return out


def resized_size(w: int, h: int) -> tuple[int, int]:
    if w <= h:
        return RESIZE_SHORTER, int(np.floor(h * RESIZE_SHORTER / w + 0.5))
    return int(np.floor(w * RESIZE_SHORTER / h + 0.5)), RESIZE_SHORTER


def crop_offsets(w: int, h: int) -> tuple[int, int]:
    return (w - CROP) // 2, (h - CROP) // 2


def to_tensor(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]  # [1,3,32,32]


def preprocess(png: bytes, pillow: bool = False) -> tuple[np.ndarray, dict]:
    img = Image.open(io.BytesIO(png))
    mode, (w, h) = img.mode, img.size
    rgb_img = img.convert("RGB")
    nw, nh = resized_size(w, h)
    if pillow:
        resized = np.asarray(rgb_img.resize((nw, nh), Image.Resampling.BILINEAR))
    else:
        resized = resize_triangle(np.asarray(rgb_img), nw, nh)
    left, top = crop_offsets(nw, nh)
    crop = resized[top:top + CROP, left:left + CROP]
    info = {"png_mode": mode, "size": [w, h], "resized": [nw, nh], "crop_offset": [left, top]}
    return to_tensor(crop), info


# -------------------------------------------------------------------- output
def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def dumps(obj, indent: str = "") -> str:
    """JSON with one key per line, lists of scalars on one line."""
    inner = indent + " "
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False)


def main() -> int:
    check = "--check" in sys.argv[1:]
    files: dict[str, bytes] = {}

    images = {name: png_bytes(img) for name, img in make_images().items()}
    for name, data in images.items():
        files[f"images/{name}"] = data
    prepared = {name: preprocess(png) for name, png in images.items()}

    model = build_model(np.concatenate([tensor for tensor, _ in prepared.values()]))
    model_bytes = model.SerializeToString()
    files["tiny-cnn.onnx"] = model_bytes
    files["tiny-cnn.labels.txt"] = ("\n".join(LABELS) + "\n").encode()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])

    per_image = []
    failures = []
    first_tensor = None
    for name, png in images.items():
        tensor, info = prepared[name]
        pil_tensor, _ = preprocess(png, pillow=True)
        if first_tensor is None:
            first_tensor = tensor
        (logits,) = session.run(["logits"], {"input": tensor})
        (pil_logits,) = session.run(["logits"], {"input": pil_tensor})
        probs = softmax(logits)[0]
        pil_probs = softmax(pil_logits)[0]
        order = np.argsort(-logits[0], kind="stable")
        top = order[:3]
        gaps = [float(logits[0, order[k]] - logits[0, order[k + 1]]) for k in range(3)]
        if min(gaps) < MIN_LOGIT_GAP:
            failures.append(f"{name}: logit gaps {gaps} below {MIN_LOGIT_GAP}")
        if list(np.argsort(-pil_logits[0], kind="stable")[:3]) != list(top):
            failures.append(f"{name}: Pillow's resize gives another top-3")
        per_image.append(
            {
                "file": f"tests/models/images/{name}",
                **info,
                "top3": [{"index": int(i), "label": LABELS[i], "score": float(probs[i])} for i in top],
                "logits": [float(v) for v in logits[0]],
                "scores": [float(v) for v in probs],
                "logit_gaps_top4": gaps,
                "tensor_sum": float(tensor.astype(np.float64).sum()),
                "tensor_first_values": [float(v) for v in tensor.reshape(-1)[:8]],
                "pillow_bilinear": {
                    "max_abs_tensor_diff": float(np.abs(pil_tensor - tensor).max()),
                    "max_abs_score_diff": float(np.abs(pil_probs - probs).max()),
                },
            }
        )

    reference = {
        "model": {
            "file": "tests/models/tiny-cnn.onnx",
            "labels_file": "tests/models/tiny-cnn.labels.txt",
            "labels": LABELS,
            "input": {"name": "input", "datatype": "FP32", "shape": ["N", 3, 32, 32], "layout": "NCHW"},
            "output": {"name": "logits", "datatype": "FP32", "shape": ["N", len(LABELS)]},
            "graph": "Conv 3x3 x8 (pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (transB) -> logits",
            "weights_seed": SEED,
            "opset": 13,
        },
        "preprocessing": {
            "decode": "PNG -> 8-bit RGB; alpha dropped (not composited), grey replicated to R, G and B",
            "resize": {
                "shorter_side": RESIZE_SHORTER,
                "longer_side": "round(longer * 36 / shorter), e.g. 40x48 -> 36x43",
                "filter": "bilinear: image::imageops::FilterType::Triangle (image 0.25), "
                          "vertical pass in f32 then horizontal pass rounded to u8",
            },
            "center_crop": {"size": [CROP, CROP], "offset": "floor((side - 32) / 2) on each axis"},
            "scale": "x / 255",
            "mean": MEAN,
            "std": STD,
            "normalize": "(x / 255 - mean[c]) / std[c]",
            "layout": "NCHW",
            "dtype": "float32",
        },
        "scores": "softmax over the 5 logits",
        "images": per_image,
        "suggested_tolerance": {
            "score": 1e-4,
            "tensor": 1e-5,
            "note": "with another bilinear resize (e.g. Pillow's) the top-3 order is the same "
                    "and scores move by up to pillow_bilinear.max_abs_score_diff",
        },
    }
    files["tiny-cnn-reference.json"] = (dumps(reference) + "\n").encode()

    # KServe v2 (Open Inference Protocol) request and response for the first image.
    data = [round(float(v), 6) for v in first_tensor.reshape(-1)]
    sent = np.array(data, dtype=np.float32).reshape(first_tensor.shape)
    (logits,) = session.run(["logits"], {"input": sent})
    request = {
        "id": "tiny-cnn-1",
        "inputs": [{"name": "input", "shape": list(sent.shape), "datatype": "FP32", "data": data}],
        "outputs": [{"name": "logits"}],
    }
    response = {
        "model_name": "tiny-cnn",
        "id": "tiny-cnn-1",
        "outputs": [
            {"name": "logits", "shape": list(logits.shape), "datatype": "FP32",
             "data": [round(float(v), 6) for v in logits.reshape(-1)]}
        ],
    }
    files["tiny-cnn-tensor-request.json"] = (json.dumps(request, separators=(",", ":")) + "\n").encode()
    files["tiny-cnn-tensor-response.json"] = (dumps(response) + "\n").encode()

    for img in per_image:
        tops = ", ".join(f"{t['label']} {t['score']:.4f}" for t in img["top3"])
        print(f"{img['file']}: {tops}  (min logit gap {min(img['logit_gaps_top4']):.3f}, "
              f"Pillow resize moves scores by {img['pillow_bilinear']['max_abs_score_diff']:.2e})")
    if failures:
        print("error: " + "; ".join(failures), file=sys.stderr)
        return 1

    if check:
        differing = [n for n, b in files.items() if not (HERE / n).is_file() or (HERE / n).read_bytes() != b]
        if differing:
            print("differ from what make_cnn.py generates: " + ", ".join(differing), file=sys.stderr)
            return 1
        print(f"all {len(files)} files match", file=sys.stderr)
        return 0
    (HERE / "images").mkdir(exist_ok=True)
    for n, b in files.items():
        (HERE / n).write_bytes(b)
        print(f"wrote tests/models/{n} ({len(b)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
