"""runs/demo.sh, the storyboard, stays in step with the command line: every `tinyllm` line in it parses (each
option exists and has a valid value). A stand-in `tinyllm` on PATH records each call's arguments (it imports
nothing, so the script runs in a second); the test then parses every recorded call with the real parser. Nothing is
trained."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tiny_llama2_zh.cli import _subcommand_parser, build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]

RECORD_ONLY = """#!{python} -S
import json, sys
with open({log!r}, "a", encoding="utf-8") as log:
    log.write(json.dumps(sys.argv[1:], ensure_ascii=False) + "\\n")
"""


def test_every_storyboard_command_parses(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    stand_in = bin_dir / "tinyllm"
    stand_in.write_text(RECORD_ONLY.format(python=sys.executable, log=str(log)), encoding="utf-8")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(
        ["bash", "runs/demo.sh", str(tmp_path / "run")], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    for argv in calls:
        subcommand = _subcommand_parser(argv)
        subcommand.parse_args(argv[2:]) if subcommand else build_parser().parse_args(argv)  # exits on a bad option
    stages = {argv[0] for argv in calls}
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "quantize", "export", "eval", "report"):
        assert stage in stages, stage
