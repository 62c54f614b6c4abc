"""Reference sentence embeddings of all-MiniLM-L6-v2, for the Rust tests.

Runs the ONNX model that scripts/fetch-models.sh writes to
models/all-MiniLM-L6-v2/ with ONNX Runtime directly, the way
sentence-transformers runs this model:

  tokenize   tokenizer.json with the `tokenizers` package, truncation at 256
             tokens (sentence-transformers' max_seq_length for this model;
             tokenizer.json itself says 128) and padding to the longest
             sentence of the batch (tokenizer.json itself says a fixed 128)
  run        input_ids, attention_mask, token_type_ids (all zeros), int64
             [batch, seq] -> last_hidden_state float32 [batch, seq, 384]
  pool       mean of the token vectors over attention_mask
  normalise  divide by the L2 norm

and writes tests/models/minilm-reference.json: for each sentence its token
ids (truncated, unpadded) and the first 8 dimensions of its embedding, and
the cosine of every pair of sentences. Run it with the venv python that
scripts/fetch-models.sh set up:

  bash scripts/fetch-models.sh
  .venv/bin/python tests/models/reference.py [--check]

--check compares against the committed JSON instead of writing it, and
exits non-zero if anything moved by more than 1e-5.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "all-MiniLM-L6-v2"
OUT = Path(__file__).resolve().parent / "minilm-reference.json"

MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model
FIRST_DIMS = 8

LONG_TEXT = " ".join(
    [
        "A message broker sits between the programs that produce work and the programs that do it,",
        "so that neither has to know where the other runs, how fast it is, or whether it is up at all.",
        "A producer publishes a message to an exchange, the exchange routes it to one or more queues",
        "by the bindings that connect them, and consumers take messages from the queues at their own pace.",
        "When a consumer has finished with a message it acknowledges it, and only then does the broker forget it;",
        "if the consumer dies first, the message goes back to its queue and another consumer receives it.",
        "Durable queues keep their messages on disk, so a restart of the broker loses nothing that was confirmed.",
        "Machine learning systems lean on brokers in the same way. A request to classify an image,",
        "to embed a paragraph of text, or to transcribe a recording is a message like any other;",
        "a pool of workers with accelerators takes requests from a queue, groups them into batches",
        "that keep the hardware busy, runs the model, and publishes each answer to the reply queue",
        "named by the request. Because the queue absorbs bursts, the workers can be sized for the average load",
        "rather than the peak, and because every request is acknowledged only after its answer is published,",
        "a worker that crashes in the middle of a batch costs a little time but never a request.",
        "What is new is how much each message costs and how uneven that cost can be. A short sentence",
        "takes a fraction of a millisecond to embed, while a long document takes far longer, and a batch",
        "is only as fast as its slowest member, since every sequence in it is padded to the longest one.",
        "Good batching therefore groups requests of similar size, waits a few milliseconds for a batch to fill",
        "when traffic is light, and never waits at all when the queue is already deep enough to fill it.",
        "The broker is the natural place to make those decisions, because it is the one component",
        "that sees every request arrive, knows how many are waiting, and knows which workers are idle.",
        "Putting the model next to the queues removes a network hop and a serialisation step,",
        "and lets the same acknowledgements, limits and metrics govern inference as govern every other message.",
    ]
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell today.",
    "",
    LONG_TEXT,
]

PRINTED_PAIRS = [(0, 1), (0, 2)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tokenizer() -> tuple[Tokenizer, dict]:
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    raw = json.loads((MODEL_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    file_config = {
        "truncation": raw["truncation"],
        "padding": raw["padding"],
        "normalizer": raw["normalizer"],
    }
    # What sentence-transformers does for this model, whatever tokenizer.json says.
    tok.enable_truncation(max_length=MAX_SEQ_LENGTH)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")  # to the longest
    return tok, file_config


def encode_batch(tok: Tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:
    encs = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
    }


def embed(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple]:
    (hidden,) = session.run(["last_hidden_state"], feeds)
    mask = feeds["attention_mask"].astype(np.float32)[:, :, None]
    summed = (hidden * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)  # as sentence-transformers
    mean = summed / counts
    norms = np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)  # as F.normalize
    return (mean / norms).astype(np.float32), hidden.shape


def describe(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type
        out.append({"name": v.name, "type": t, "shape": [d if isinstance(d, int) else str(d) for d in v.shape]})
    return out


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
    for name in ("model.onnx", "tokenizer.json"):
        if not (MODEL_DIR / name).is_file():
            print(f"error: {MODEL_DIR / name} is missing: run bash scripts/fetch-models.sh", file=sys.stderr)
            return 1

    tok, file_config = load_tokenizer()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # reproducible reductions
    session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    inputs, outputs = describe(session.get_inputs()), describe(session.get_outputs())

    feeds = encode_batch(tok, SENTENCES)
    emb, hidden_shape = embed(session, feeds)
    assert hidden_shape == (len(SENTENCES), feeds["input_ids"].shape[1], 384), hidden_shape

    # Each sentence alone (no padding) must give the same vector as in the batch.
    alone = np.concatenate([embed(session, encode_batch(tok, [s]))[0] for s in SENTENCES])
    batch_vs_alone = float(np.abs(alone - emb).max())

    # token_type_ids is a required input, and it does matter: ones instead of zeros move the vectors.
    try:
        session.run(None, {k: v for k, v in feeds.items() if k != "token_type_ids"})
        token_type_ids_required = False
    except Exception:
        token_type_ids_required = True
    ones = dict(feeds, token_type_ids=np.ones_like(feeds["token_type_ids"]))
    token_type_ones_diff = float(np.abs(embed(session, ones)[0] - emb).max())

    cos = emb.astype(np.float64) @ emb.astype(np.float64).T

    tok.no_padding()
    full = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    full.no_truncation()
    full.no_padding()
    sentences = []
    for i, s in enumerate(SENTENCES):
        enc = tok.encode(s)
        sentences.append(
            {
                "text": s,
                "words": len(s.split()),
                "token_ids": enc.ids,
                "tokens": enc.tokens if len(enc.ids) <= 32 else enc.tokens[:16] + ["..."] + enc.tokens[-4:],
                "tokens_before_truncation": len(full.encode(s).ids),
                "embedding_first_dims": [float(x) for x in emb[i, :FIRST_DIMS]],
                "embedding_sum": float(emb[i].astype(np.float64).sum()),
            }
        )

    result = {
        "model": {
            "name": "sentence-transformers/all-MiniLM-L6-v2 (ONNX, int8 weights dequantized in the graph)",
            "file": "models/all-MiniLM-L6-v2/model.onnx",
            "sha256": sha256(MODEL_DIR / "model.onnx"),
            "inputs": inputs,
            "outputs": outputs,
            "output_is": "token embeddings [batch, seq, 384]; pool them",
            "token_type_ids": "required input; feed zeros",
            "onnxruntime": ort.__version__,
        },
        "tokenizer": {
            "file": "models/all-MiniLM-L6-v2/tokenizer.json",
            "sha256": sha256(MODEL_DIR / "tokenizer.json"),
            "as_in_file": file_config,
            "used": {
                "lowercase": True,
                "truncation": {"max_length": MAX_SEQ_LENGTH, "strategy": "LongestFirst", "direction": "Right"},
                "padding": {"strategy": "BatchLongest", "direction": "Right", "pad_id": 0, "pad_token": "[PAD]", "pad_type_id": 0},
                "special_tokens": {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103},
                "template": "[CLS] $A [SEP]",
            },
        },
        "pipeline": {
            "pooling": "mean over tokens with attention_mask 1 (padding excluded; [CLS] and [SEP] included)",
            "normalize": "L2",
            "dimensions": 384,
            "batch": "all sentences in one batch, padded to the longest (the long one, 256 tokens)",
            "max_abs_diff_batch_vs_alone": batch_vs_alone,
            "max_abs_diff_token_type_ids_ones": token_type_ones_diff,
        },
        "sentences": sentences,
        "cosines": [
            {"a": i, "b": j, "cosine": float(cos[i, j])}
            for i in range(len(SENTENCES))
            for j in range(i + 1, len(SENTENCES))
        ],
        "suggested_tolerance": {"embedding_dims": 1e-4, "cosine": 1e-4},
    }

    print(f"token_type_ids required: {token_type_ids_required}", file=sys.stderr)
    print(f"hidden state shape: {hidden_shape}; batch vs alone max |diff|: {batch_vs_alone:.3g}", file=sys.stderr)
    for s in sentences:
        print(f"{len(s['token_ids']):4d} tokens ({s['tokens_before_truncation']} before truncation): {s['text'][:50]!r}", file=sys.stderr)
    for i, j in PRINTED_PAIRS:
        print(f"cosine({SENTENCES[i]!r}, {SENTENCES[j]!r}) = {cos[i, j]:.6f}")

    text = dumps(result) + "\n"
    if check:
        old = json.loads(OUT.read_text(encoding="utf-8"))
        bad = []
        for a, b in zip(old["sentences"], sentences):
            if a["token_ids"] != b["token_ids"]:
                bad.append(f"token ids of {a['text'][:30]!r}")
            if max(abs(x - y) for x, y in zip(a["embedding_first_dims"], b["embedding_first_dims"])) > 1e-5:
                bad.append(f"embedding of {a['text'][:30]!r}")
        for a, b in zip(old["cosines"], result["cosines"]):
            if abs(a["cosine"] - b["cosine"]) > 1e-5:
                bad.append(f"cosine {a['a']}-{a['b']}")
        if bad:
            print("differs from " + str(OUT.relative_to(ROOT)) + ": " + ", ".join(bad), file=sys.stderr)
            return 1
        print(f"matches {OUT.relative_to(ROOT)}", file=sys.stderr)
    else:
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
