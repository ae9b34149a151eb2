"""runs/demo.sh, the storyboard, stays in step with the command line: every `tinyllm` line in it parses (each
option exists and has a valid value). A stand-in `tinyllm` on PATH parses its arguments with the real parser and
records them; nothing is trained."""

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PARSE_ONLY = """#!{python}
import json, sys
from tiny_llama2_zh.cli import _subcommand_parser, build_parser
argv = sys.argv[1:]
subcommand = _subcommand_parser(argv)
args = subcommand.parse_args(argv[2:]) if subcommand else build_parser().parse_args(argv)
with open({log!r}, "a", encoding="utf-8") as log:
    log.write(json.dumps(argv[:2], ensure_ascii=False) + "\\n")
"""


def test_every_storyboard_command_parses(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    stand_in = bin_dir / "tinyllm"
    stand_in.write_text(PARSE_ONLY.format(python=sys.executable, log=str(log)), encoding="utf-8")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(
        ["bash", "runs/demo.sh", str(tmp_path / "run")], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    calls = log.read_text(encoding="utf-8").splitlines()
    stages = {call.split('"')[1] for call in calls}
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "quantize", "export", "eval", "report"):
        assert stage in stages, stage
