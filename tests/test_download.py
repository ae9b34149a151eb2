"""`tinyllm data download` against a local mirror in the Hugging Face hub's URL layout (no network): a full
download whose printed `data prepare` line then reads the files, a connection dropped mid-file, a download
interrupted and resumed by the next call, a corrupt file, the benchmarks' layouts, and the errors a person meets
(unknown name, offline mode, no network)."""

import hashlib
import io
import json
import re
import shlex
import socket
import threading
import zipfile
from glob import glob
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiny_llama2_zh.cli import main
from tiny_llama2_zh.data.download import (
    Downloaded,
    DownloadError,
    _human,
    _paths_argument,
    download,
    git_blob_sha1,
    on_disk,
    reading_lines,
)
from tiny_llama2_zh.data.sources import BENCHMARKS, CORPORA, SOURCES
from tiny_llama2_zh.eval import multiple_choice as mc

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FIXTURES = Path(__file__).parent / "fixtures"
# huggingface_hub writes what arrives in chunks of DOWNLOAD_CHUNK_SIZE (10 MB); the tests shrink the chunk so that
# a file of a few kilobytes can be cut mid-way, after two whole chunks
CHUNK = 4096
DROP_AFTER = 2 * CHUNK


class Mirror:
    """A hub for one dataset repository, served from memory the way huggingface.co answers huggingface_hub:
    `/api/datasets/{repo}/revision/{rev}` (the commit), `/api/datasets/{repo}/tree/{rev}` (files with size, git
    blob id and, for LFS files, SHA-256) and `/datasets/{repo}/resolve/{rev}/{path}` (HEAD and GET, with the
    X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size headers and byte ranges). Faults on request: `drop_once`
    (paths whose next full GET stops after DROP_AFTER bytes, connection closed), `refuse_ranges` (answer a Range
    with 503), `served` (bytes served instead of a file's listed content)."""

    def __init__(self, repo_id: str, files: dict[str, bytes], lfs: set[str] | None = None):
        self.repo_id, self.files = repo_id, files
        self.lfs = set(files) if lfs is None else lfs
        self.drop_once: set[str] = set()
        self.refuse_ranges = False
        self.served: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, file path, Range header)
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                mirror.answer(self, head=False)

            def do_HEAD(self):
                mirror.answer(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def entry(self, path: str) -> dict:
        data = self.files[path]
        git_oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        row = {"type": "file", "oid": git_oid, "size": len(data), "path": path}
        if path in self.lfs:
            row["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return row

    def _json(self, handler, payload, status=200, headers=()):
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def answer(self, handler, head: bool):
        url = urlparse(handler.path)
        path = unquote(url.path)
        repo = re.escape(self.repo_id)
        if match := re.fullmatch(rf"/api/datasets/{repo}/revision/([^/]+)", path):
            return self._json(handler, {"id": self.repo_id, "sha": COMMIT, "private": False})
        if re.fullmatch(rf"/api/datasets/{repo}/tree/{COMMIT}", path):
            folders = sorted({str(Path(p).parent) for p in self.files} - {"."})
            listing = [{"type": "directory", "oid": "0" * 40, "path": f} for f in folders]
            return self._json(handler, listing + [self.entry(p) for p in sorted(self.files)])
        if (match := re.fullmatch(rf"/datasets/{repo}/resolve/{COMMIT}/(.+)", path)) and match[1] in self.files:
            return self.resolve(handler, match[1], head)
        return self._json(handler, {"error": "Repository not found"}, 404, [("X-Error-Code", "RepoNotFound")])

    def resolve(self, handler, name: str, head: bool):
        listed = self.entry(name)
        data = self.served.get(name, self.files[name])
        byte_range = handler.headers.get("Range")
        self.log.append(("HEAD" if head else "GET", name, byte_range))
        start = int(re.fullmatch(r"bytes=(\d+)-", byte_range)[1]) if byte_range else 0
        if byte_range and self.refuse_ranges:
            return self._json(handler, {"error": "unavailable"}, 503)
        etag = listed["lfs"]["oid"] if "lfs" in listed else listed["oid"]
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{etag}"')
        if "lfs" in listed:
            handler.send_header("X-Linked-Etag", f'"{etag}"')
            handler.send_header("X-Linked-Size", str(len(data)))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if head:
            return
        body = data[start:]
        if name in self.drop_once and not start:
            self.drop_once.discard(name)
            handler.wfile.write(body[:DROP_AFTER])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)  # the peer sees the body end early
            handler.close_connection = True
            return
        handler.wfile.write(body)


@pytest.fixture
def online(monkeypatch):
    """The suite runs offline (conftest); huggingface_hub reads HF_HUB_OFFLINE at import, so this test turns
    its constant off too, for the local mirror only."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda seconds: None)  # its retry pause
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)


@pytest.fixture
def mirrors():
    started = []
    yield lambda *args, **kwargs: started.append(Mirror(*args, **kwargs)) or started[-1]
    for mirror in started:
        mirror.close()


def belle_conversations_file(count: int = 40) -> bytes:
    """train_3.5M_CN.json's shape; every fourth reply opens with newlines, as school_math's do."""
    lines = []
    for i in range(count):
        reply = ("\n\n" if i % 4 == 0 else "") + f"第{i}题的答案是{i * 3}。" + "解题过程如下。" * 20
        turns = [
            {"from": "human", "value": f"请计算第{i}题：{i}乘以3等于多少？"},
            {"from": "assistant", "value": reply},
        ]
        lines.append(json.dumps({"id": str(i), "conversations": turns}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def test_the_registry_names_an_adapter_or_benchmark_for_every_corpus():
    for corpus in CORPORA.values():
        assert corpus.name in SOURCES or corpus.name in BENCHMARKS
        assert corpus.allow_patterns and corpus.licence and corpus.approximate_size
    assert {"belle_conversations", "preference_qa"} <= set(SOURCES)


def test_a_full_download_prints_a_prepare_line_that_reads_the_files(online, mirrors, tmp_path, capsys, monkeypatch):
    content = belle_conversations_file()
    mirror = mirrors("BelleGroup/train_3.5M_CN", {"train_3.5M_CN.json": content, "README.md": b"# Belle\n"}, {"x"})
    monkeypatch.setenv("HF_ENDPOINT", mirror.endpoint)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "download", "belle_conversations", "--output", "raw"]) == 0
    out = capsys.readouterr().out
    target = tmp_path / "raw" / "belle_conversations" / "train_3.5M_CN.json"
    assert target.read_bytes() == content
    assert not (tmp_path / "raw" / "belle_conversations" / "README.md").exists()  # not an allowed file
    assert [entry[:2] for entry in mirror.log] == [("GET", "train_3.5M_CN.json")]
    line = next(line for line in out.splitlines() if line.startswith("tinyllm data prepare"))
    assert line == (
        "tinyllm data prepare --output data/sft --source belle_conversations raw/belle_conversations/train_3.5M_CN.json"
    )
    assert main(shlex.split(line)[1:]) == 0
    out = capsys.readouterr().out
    assert "reply stripped of leading whitespace: 10 records (kept)" in out
    written = [
        json.loads(row)
        for split in ("train", "test")
        for row in (tmp_path / "data/sft" / f"sft-{split}.jsonl").read_text().splitlines()
    ]
    assert len(written) == 40
    assert all(not r["messages"][1]["content"][0].isspace() for r in written)
    # a second call finds the file verified and fetches nothing
    assert main(["data", "download", "belle_conversations", "--output", "raw"]) == 0
    assert "belle_conversations: raw/belle_conversations (gpl-3.0; already verified)" in capsys.readouterr().out
    assert len([entry for entry in mirror.log if entry[0] == "GET"]) == 1
    assert main(["data", "download", "--list", "--output", "raw"]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("belle_conversations"))
    assert "gpl-3.0" in row and f"  {_human(on_disk(tmp_path / 'raw' / 'belle_conversations'))}  1" in row


def test_a_connection_dropped_mid_file_is_resumed_with_a_range_request(online, mirrors, tmp_path):
    content = belle_conversations_file(200)
    mirror = mirrors("BelleGroup/train_3.5M_CN", {"train_3.5M_CN.json": content})
    mirror.drop_once.add("train_3.5M_CN.json")
    result = download(CORPORA["belle_conversations"], tmp_path, mirror.endpoint)
    assert result.files[0].read_bytes() == content
    assert [entry for entry in mirror.log if entry[0] == "GET"] == [
        ("GET", "train_3.5M_CN.json", None),
        ("GET", "train_3.5M_CN.json", f"bytes={DROP_AFTER}-"),
    ]


def test_an_interrupted_download_resumes_on_the_next_call(online, mirrors, tmp_path):
    content = belle_conversations_file(200)
    mirror = mirrors("BelleGroup/train_3.5M_CN", {"train_3.5M_CN.json": content})
    mirror.drop_once.add("train_3.5M_CN.json")
    mirror.refuse_ranges = True  # the retry within the call fails too: the call stops, as a lost network would
    with pytest.raises(DownloadError, match=r"could not fetch BelleGroup/train_3.5M_CN .*Rerun the same command"):
        download(CORPORA["belle_conversations"], tmp_path, mirror.endpoint)
    partial = tmp_path / "belle_conversations" / ".partial" / "train_3.5M_CN.json.part"
    assert partial.stat().st_size == DROP_AFTER
    assert not (tmp_path / "belle_conversations" / "train_3.5M_CN.json").exists()
    mirror.refuse_ranges = False
    mirror.log.clear()
    result = download(CORPORA["belle_conversations"], tmp_path, mirror.endpoint)
    assert mirror.log == [("GET", "train_3.5M_CN.json", f"bytes={DROP_AFTER}-")]  # only the missing bytes travel
    assert result.files[0].read_bytes() == content and not partial.exists()


def test_a_corrupt_file_is_reported_removed_and_fetched_again_by_the_next_call(online, mirrors, tmp_path):
    content = belle_conversations_file()
    mirror = mirrors("BelleGroup/train_3.5M_CN", {"train_3.5M_CN.json": content})
    damaged = bytearray(content)
    damaged[100] ^= 0x01
    mirror.served["train_3.5M_CN.json"] = bytes(damaged)
    expected = hashlib.sha256(content).hexdigest()
    with pytest.raises(
        DownloadError, match=rf"train_3.5M_CN.json .* is corrupt: SHA-256 \w+, the hub lists {expected}"
    ):
        download(CORPORA["belle_conversations"], tmp_path, mirror.endpoint)
    folder = tmp_path / "belle_conversations"
    assert not (folder / "train_3.5M_CN.json").exists() and not list((folder / ".partial").glob("*.part"))
    del mirror.served["train_3.5M_CN.json"]
    assert download(CORPORA["belle_conversations"], tmp_path, mirror.endpoint).files[0].read_bytes() == content


def test_a_small_file_kept_in_git_is_checked_by_its_git_blob_id(online, mirrors, tmp_path):
    table = b"prompt\tchosen\trejected\n\xe9\x97\xae\t\xe5\xa5\xbd\t\xe5\x9d\x8f\n"
    mirror = mirrors("liyucheng/zhihu_rlhf_3k", {"zhihu_3k_rlfh.tsv": table}, lfs=set())
    mirror.served["zhihu_3k_rlfh.tsv"] = table.replace(b"prompt", b"PROMPT")
    with pytest.raises(DownloadError, match=r"git blob id \w+, the hub lists"):
        download(CORPORA["zhihu_rlhf_3k"], tmp_path, mirror.endpoint)
    mirror.served.clear()
    result = download(CORPORA["zhihu_rlhf_3k"], tmp_path, mirror.endpoint)
    assert git_blob_sha1(result.files[0]) == mirror.entry("zhihu_3k_rlfh.tsv")["oid"]


def _parquet_bytes(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def ceval_parquet(split: str, subject: str) -> bytes:
    rows = _csv_rows(FIXTURES / "ceval" / split / f"{subject}_{split}.csv")
    for row in rows:
        row["id"] = int(row["id"])  # int32 in the hub's parquet
        row.setdefault("explanation", "")
    return _parquet_bytes(rows)


def test_ceval_in_the_hubs_layout_downloads_dev_and_val_and_eval_reads_it(online, mirrors, tmp_path, capsys):
    files = {"ceval-exam.zip": b"PK\x05\x06" + bytes(18)}
    for subject in ("computer_network", "high_school_geography"):
        for split in ("dev", "val"):
            files[f"{subject}/{split}-00000-of-00001.parquet"] = ceval_parquet(split, subject)
        files[f"{subject}/test-00000-of-00001.parquet"] = ceval_parquet("val", subject)
    mirror = mirrors("ceval/ceval-exam", files)
    result = download(CORPORA["ceval"], tmp_path, mirror.endpoint)
    assert sorted(name for _, name, _ in mirror.log) == sorted(
        f"{s}/{split}-00000-of-00001.parquet"
        for s in ("computer_network", "high_school_geography")
        for split in ("dev", "val")
    )
    assert result.reading_line() == f"tinyllm eval mc --model MODEL --ceval-dir {tmp_path / 'ceval'}"
    from_parquet = mc.read_ceval(tmp_path / "ceval")
    from_csv = mc.read_ceval(FIXTURES / "ceval")
    assert [t.subject for t in from_parquet] == [t.subject for t in from_csv]
    for parquet_task, csv_task in zip(from_parquet, from_csv):
        assert [(q.id, q.prompt, q.answer) for q in parquet_task.questions] == [
            (q.id, q.prompt, q.answer) for q in csv_task.questions
        ]
        assert len(parquet_task.dev) == len(csv_task.dev) == 5
    assert from_parquet[0].questions[0].source.endswith("computer_network/val-00000-of-00001.parquet:row 1")


def test_cmmlus_zip_is_unpacked_and_the_printed_folder_is_what_eval_reads(online, mirrors, tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted((FIXTURES / "cmmlu").rglob("*.csv")):
            bundle.write(path, path.relative_to(FIXTURES / "cmmlu").as_posix())
    mirror = mirrors("haonan-li/cmmlu", {"cmmlu_v1_0_1.zip": archive.getvalue(), "cmmlu.py": b"# loader\n"})
    result = download(CORPORA["cmmlu"], tmp_path, mirror.endpoint)
    folder = shlex.split(result.reading_line())[-1]
    assert Path(folder) == tmp_path / "cmmlu"
    assert [t.subject for t in mc.read_cmmlu(folder)] == ["agronomy", "chinese_history"]


def test_a_zip_member_outside_the_folder_is_refused(online, mirrors, tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("../escaped.csv", "x")
    mirror = mirrors("haonan-li/cmmlu", {"cmmlu_v1_0_1.zip": archive.getvalue()})
    with pytest.raises(DownloadError, match="would be written outside"):
        download(CORPORA["cmmlu"], tmp_path / "raw", mirror.endpoint)
    assert not (tmp_path / "escaped.csv").exists()


def test_many_files_of_one_folder_are_one_glob_that_matches_exactly_them(tmp_path):
    shards = [tmp_path / "data" / f"train-0000{i}-of-00005.parquet" for i in range(5)]
    for path in shards:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "data" / "test-00000-of-00001.parquet").write_bytes(b"x")
    argument = _paths_argument(shards)
    assert argument == f"{tmp_path / 'data'}/train-0000*.parquet"
    assert sorted(glob(argument)) == [str(p) for p in shards]
    assert _paths_argument([*shards[:4], tmp_path / "data" / "test-00000-of-00001.parquet"]).count(" ") == 4


def test_errors_are_one_line_never_a_traceback(mirrors, tmp_path, capsys, monkeypatch):
    assert main(["data", "download", "belle", "no_such_corpus", "--output", str(tmp_path)]) == 2
    assert "unknown corpus 'no_such_corpus'; known corpora: wikipedia_cn, baidubaike" in capsys.readouterr().err
    assert main(["data", "download", "--output", str(tmp_path)]) == 2
    assert "name the corpora to download (or --list)" in capsys.readouterr().err
    # the suite's HF_HUB_OFFLINE=1
    assert main(["data", "download", "cvalues", "--output", str(tmp_path)]) == 2
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    assert main(["data", "download", "cvalues", "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tinyllm: error: cvalues: could not fetch mxz/CValues from http://127.0.0.1:")
    assert "set HF_ENDPOINT to a mirror" in error and "Traceback" not in error
    mirror = mirrors("someone/else", {"x.json": b"{}"})
    monkeypatch.setenv("HF_ENDPOINT", mirror.endpoint)
    assert main(["data", "download", "cvalues", "--output", str(tmp_path)]) == 2
    assert "mxz/CValues is not a dataset repository at http://127.0.0.1:" in capsys.readouterr().err


def test_one_prepare_call_per_kind_into_the_folders_the_recipes_read(tmp_path):
    def downloaded(name: str, *files: str) -> Downloaded:
        return Downloaded(CORPORA[name], tmp_path / name, COMMIT, [tmp_path / name / f for f in files])

    lines = reading_lines(
        [
            downloaded("wikipedia_cn", "wikipedia-cn-20230720-filtered.json"),
            downloaded("belle_conversations", "train_3.5M_CN.json"),
            downloaded("zhihu_kol", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"),
            downloaded("zhihu_rlhf_3k", "zhihu_3k_rlfh.tsv"),
            downloaded("cvalues", "data/train-00000-of-00001.parquet"),
        ]
    )
    raw = str(tmp_path)
    assert lines == [
        f"tinyllm data prepare --tokenizer data/tokenizer/chatglm3 --output data/pretrain --source wikipedia_cn "
        f"{raw}/wikipedia_cn/wikipedia-cn-20230720-filtered.json --source zhihu_kol "
        f"{raw}/zhihu_kol/data/train-00000-of-00002.parquet {raw}/zhihu_kol/data/train-00001-of-00002.parquet",
        f"tinyllm data prepare --output data/sft --source belle_conversations "
        f"{raw}/belle_conversations/train_3.5M_CN.json",
        f"tinyllm data prepare --output data/preference/zhihu_rlhf_3k --source zhihu_rlhf_3k "
        f"{raw}/zhihu_rlhf_3k/zhihu_3k_rlfh.tsv",
        f"tinyllm data prepare --output data/preference/cvalues --source cvalues "
        f"{raw}/cvalues/data/train-00000-of-00001.parquet",
    ]
