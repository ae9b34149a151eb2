"""Run a GGUF file in real llama.cpp from Python: the prebuilt libllama that the npm package node-llama-cpp
ships, driven by the repository's `tests/runtimes/llamacpp/run_gguf.mjs` (installed with `npm ci` there; see
.ci/run). Used by the export tests and `benchmarks/llamacpp_decode.py`; a checkout without node or the package
gets a message saying what to install."""

import json
import os
import shutil
import subprocess
from pathlib import Path

RUNTIME_DIR = Path(
    os.environ.get("TINYLLM_LLAMACPP_DIR", Path(__file__).resolve().parents[3] / "tests" / "runtimes" / "llamacpp")
)


def llamacpp_missing(runtime_dir: Path = RUNTIME_DIR) -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (llama.cpp runs through the npm package node-llama-cpp)"
    if not (runtime_dir / "run_gguf.mjs").is_file():
        return f"{runtime_dir}/run_gguf.mjs not found (it is in the repository's tests/runtimes/llamacpp)"
    if not (runtime_dir / "node_modules" / "node-llama-cpp").is_dir():
        return f"node-llama-cpp is not installed: run `npm ci` in {runtime_dir}"
    return None


def run_gguf(request: dict, runtime_dir: Path = RUNTIME_DIR, timeout: float = 600) -> dict:
    """One request to run_gguf.mjs (its header documents the fields): tokenize texts and/or greedy-generate."""
    missing = llamacpp_missing(runtime_dir)
    if missing:
        raise FileNotFoundError(missing)
    request = {**request, "model": str(Path(request["model"]).resolve())}  # node runs in runtime_dir
    result = subprocess.run(
        ["node", "run_gguf.mjs"],
        cwd=runtime_dir,
        input=json.dumps(request, ensure_ascii=False),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp (node-llama-cpp) failed with exit code {result.returncode}:\n{result.stderr}")
    return json.loads(result.stdout)
