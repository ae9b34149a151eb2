"""`tinyllm data download NAME...`: the seed's corpora from the Hugging Face hub, verified, and the line that
reads them (`tinyllm data prepare ...`, or `tinyllm eval mc ...` for the benchmarks).

Which repository and which of its files: `CORPORA` in data/sources.py, beside the adapters that read them. For
each corpus the repository's revision is resolved to one commit (`/api/datasets/{repo}/revision/main`), so every
file comes from the same snapshot; its file list (`/api/datasets/{repo}/tree/{commit}`) is filtered by the
corpus's allow-patterns with huggingface_hub's own `filter_repo_objects`; each file is fetched from
`/datasets/{repo}/resolve/{commit}/{path}` into OUTPUT/NAME/{path}.

Resumable across calls. huggingface_hub's `hf_hub_download` resumes a dropped connection within a call, but
since huggingface_hub PR 4228 (2.x) it downloads into a process-unique temporary file that it deletes when the
call fails, so an interrupted multi-gigabyte download starts over. Here the bytes go to OUTPUT/NAME/.partial/
{path}.part, kept between calls and tied (in `.part.json`) to the hash it must end with; each call continues it
with an HTTP Range request through huggingface_hub's `http_get` (which also retries dropped connections, resuming
with Range, and restarts cleanly if a server ignores the Range).

Verified: every finished file is checked against the tree listing before it is moved into place: its size, and
its SHA-256 for LFS files (the hub lists it) or, for small files kept in git, its git blob id (SHA-1 of
"blob {size}\\0" + content, git's object id). A mismatch removes the bytes and says which file, what was expected
and what arrived. A file that passed is recorded with its size and mtime in OUTPUT/NAME/.tinyllm-download.json,
so a rerun does not hash gigabytes again.

The hub's address is HF_ENDPOINT (a mirror such as https://hf-mirror.com, or a test server), passed explicitly
to every call; HF_HUB_OFFLINE=1 is refused with a message, and so is an unreachable endpoint, never with a
traceback. huggingface_hub is imported when a download runs, not when `tinyllm --help` does.
"""

import fnmatch
import hashlib
import json
import os
import shlex
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tiny_llama2_zh.data.hashing import file_sha256
from tiny_llama2_zh.data.sources import CORPORA, Corpus, get_corpus
from tiny_llama2_zh.errors import UsageError

DEFAULT_ENDPOINT = "https://huggingface.co"
RECORD_NAME = ".tinyllm-download.json"
PARTIAL_DIR = ".partial"


class DownloadError(UsageError):
    """A corpus that could not be fetched or verified: the network, the hub, or the bytes that arrived."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the tree listing, with the hash the hub gives for it."""

    path: str
    size: int
    sha256: str | None  # LFS files
    git_sha1: str | None  # every file: the git blob id (for an LFS file, the pointer's, so not used)


@dataclass
class Downloaded:
    corpus: Corpus
    folder: Path
    commit: str
    files: list[Path] = field(default_factory=list)  # the files the reader takes (a zip's content, once unpacked)
    fetched: int = 0  # files downloaded by this call (the others were already verified)
    bytes_fetched: int = 0

    def reading_line(self) -> str:
        return reading_line(self.corpus, self.folder, self.files)


def hub_endpoint() -> str:
    """HF_ENDPOINT when set (read per call, unlike huggingface_hub's import-time constant), else the hub."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT


# ------------------------------------------------------------------------------------------------ hashing


def git_blob_sha1(path: Path) -> str:
    """git's object id of a file's content: SHA-1 of `blob {size}\\0` followed by the bytes (git's object format,
    what the hub's tree listing gives as `oid` for files kept in git rather than LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatch(path: Path, remote: RemoteFile) -> str | None:
    """Why the bytes at `path` are not the hub's file, or None when size and hash agree."""
    size = path.stat().st_size
    if size != remote.size:
        return f"{size:,} bytes where the hub lists {remote.size:,}"
    if remote.sha256 is not None:
        actual = file_sha256(path)
        return None if actual == remote.sha256 else f"SHA-256 {actual}, the hub lists {remote.sha256}"
    if remote.git_sha1 is not None:
        actual = git_blob_sha1(path)
        return None if actual == remote.git_sha1 else f"git blob id {actual}, the hub lists {remote.git_sha1}"
    return None


# ------------------------------------------------------------------------------------------------ the hub
def _hub_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    return HfHubHTTPError, OfflineModeIsEnabled, httpx2.HTTPError, OSError, ValueError


def _explain(error: BaseException, corpus: Corpus, endpoint: str) -> DownloadError:
    """One line a person can act on, for anything the hub or the network raised."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, GatedRepoError):
        return DownloadError(
            f"{corpus.repo_id} is gated at {endpoint}: accept its terms on the hub and log in (`hf auth login`)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return DownloadError(f"{corpus.repo_id} is not a {corpus.repo_type} repository at {endpoint} ({first_line})")
    if isinstance(error, RevisionNotFoundError):
        return DownloadError(f"{corpus.repo_id}: revision not found at {endpoint} ({first_line})")
    return DownloadError(
        f"{corpus.name}: could not fetch {corpus.repo_id} from {endpoint}: {type(error).__name__}: {first_line}. "
        "Check the network; where the hub is blocked, set HF_ENDPOINT to a mirror (e.g. "
        "HF_ENDPOINT=https://hf-mirror.com). Rerun the same command to resume: finished files are kept and a "
        "partial one continues where it stopped."
    )


def _refuse_offline(endpoint: str) -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise DownloadError(
            f"HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing is fetched from {endpoint}: unset it to "
            "download (HF_ENDPOINT names the hub or a mirror)"
        )


def remote_files(corpus: Corpus, endpoint: str, revision: str = "main") -> tuple[str, list[RemoteFile]]:
    """(commit, the corpus's files at that commit): the revision resolved once, the tree filtered by the
    corpus's allow-patterns. No matching file is an error that lists what the repository holds."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(endpoint=endpoint, library_name="tiny-llama2-zh")
    info = (api.dataset_info if corpus.repo_type == "dataset" else api.model_info)(corpus.repo_id, revision=revision)
    commit = info.sha
    if not commit:
        raise DownloadError(f"{corpus.repo_id}: {endpoint} gave no commit for revision {revision!r}")
    entries = [
        entry
        for entry in api.list_repo_tree(corpus.repo_id, repo_type=corpus.repo_type, revision=commit, recursive=True)
        if isinstance(entry, RepoFile)
    ]
    chosen = list(filter_repo_objects(entries, allow_patterns=list(corpus.allow_patterns), key=lambda e: e.path))
    if not chosen:
        listed = ", ".join(entry.path for entry in entries[:20]) or "nothing"
        raise DownloadError(
            f"{corpus.repo_id}@{commit[:10]}: no file matches {', '.join(corpus.allow_patterns)} (the repository "
            f"holds {listed}{' ...' if len(entries) > 20 else ''}); its layout changed: update CORPORA in "
            "data/sources.py"
        )
    files = [
        RemoteFile(
            path=entry.path,
            size=entry.size,
            sha256=entry.lfs.sha256 if entry.lfs is not None else None,
            git_sha1=None if entry.lfs is not None else entry.blob_id,
        )
        for entry in chosen
    ]
    return commit, sorted(files, key=lambda f: f.path)


def _expected_hash(remote: RemoteFile) -> str:
    return remote.sha256 or remote.git_sha1 or f"size:{remote.size}"


def fetch_file(corpus: Corpus, remote: RemoteFile, commit: str, folder: Path, endpoint: str) -> Path:
    """Download one file into `folder`, resuming its partial bytes from an earlier call, verify it, and move it
    into place. A mismatch removes the bytes and raises."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    target = folder / remote.path
    part = folder / PARTIAL_DIR / f"{remote.path}.part"
    part_info = part.with_name(part.name + ".json")
    part.parent.mkdir(parents=True, exist_ok=True)
    expected = _expected_hash(remote)
    # partial bytes are only continued toward the file they were started for (same hash, hence same content)
    if part.exists() and (not part_info.is_file() or json.loads(part_info.read_text()).get("hash") != expected):
        part.unlink()
    if part.exists() and part.stat().st_size > remote.size:
        part.unlink()
    part_info.write_text(json.dumps({"repo_id": corpus.repo_id, "path": remote.path, "hash": expected}) + "\n")
    part.touch()
    url = hf_hub_url(corpus.repo_id, remote.path, repo_type=corpus.repo_type, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(library_name="tiny-llama2-zh")
    headers["Accept-Encoding"] = "identity"  # the bytes as stored: their size and hash are what is checked
    with part.open("r+b") as stream:
        stream.seek(0, os.SEEK_END)
        resume_from = stream.tell()
        if resume_from:
            print(f"  {remote.path}: resuming at byte {resume_from:,} of {remote.size:,}")
        http_get(url, stream, resume_size=resume_from, headers=headers, expected_size=remote.size)
    problem = mismatch(part, remote)
    if problem is not None:
        part.unlink()
        part_info.unlink(missing_ok=True)
        raise DownloadError(
            f"{corpus.name}: {remote.path} from {corpus.repo_id}@{commit[:10]} is corrupt: {problem}. The bytes were "
            "removed; rerun the same command to download the file again (if it fails again, the mirror at "
            f"{endpoint} serves a damaged copy)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    part.replace(target)
    part_info.unlink(missing_ok=True)
    return target


# ------------------------------------------------------------------------------------------------ records
def _read_record(folder: Path) -> dict:
    path = folder / RECORD_NAME
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        record = {}  # a damaged record only costs a re-hash
    return record if isinstance(record, dict) else {}


def _write_record(folder: Path, record: dict) -> None:
    temporary = folder / (RECORD_NAME + ".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(folder / RECORD_NAME)


def _still_verified(path: Path, entry: dict | None, remote: RemoteFile) -> bool:
    """A file verified by an earlier call, unchanged since (same size and mtime) and still the hub's file."""
    if not entry or not path.is_file() or entry.get("hash") != _expected_hash(remote):
        return False
    stat = path.stat()
    return entry.get("size") == stat.st_size == remote.size and entry.get("mtime_ns") == stat.st_mtime_ns


def _unpack(archive: Path, folder: Path) -> list[Path]:
    """Extract a zip beside itself, refusing members that would land outside `folder` (zip-slip)."""
    root = folder.resolve()
    written = []
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.infolist():
            target = (folder / member.filename).resolve()
            if root not in target.parents and target != root:
                raise DownloadError(f"{archive}: member {member.filename!r} would be written outside {folder}")
            if member.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with bundle.open(member) as source, target.open("wb") as out:
                while block := source.read(1 << 20):
                    out.write(block)
            written.append(target)
    return written


# ------------------------------------------------------------------------------------------------ download
def download(corpus: Corpus, output: str | Path, endpoint: str | None = None, revision: str = "main") -> Downloaded:
    """Fetch and verify one corpus into OUTPUT/NAME (see the module docstring); what is already there and
    verified is kept."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    _refuse_offline(endpoint)
    folder = Path(output) / corpus.name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        commit, files = remote_files(corpus, endpoint, revision)
    except _hub_errors() as error:
        if isinstance(error, DownloadError):
            raise
        raise _explain(error, corpus, endpoint) from error
    record = _read_record(folder)
    if record.get("repo_id") != corpus.repo_id:
        record = {}
    verified: dict = record.get("files", {})
    result = Downloaded(corpus=corpus, folder=folder, commit=commit)
    print(f"{corpus.name}: {corpus.repo_id}@{commit[:10]}, {len(files)} file(s), {_human(sum(f.size for f in files))}")
    for remote in files:
        target = folder / remote.path
        entry = verified.get(remote.path)
        if not _still_verified(target, entry, remote):
            try:
                fetch_file(corpus, remote, commit, folder, endpoint)
            except _hub_errors() as error:
                if isinstance(error, DownloadError):
                    raise
                raise _explain(error, corpus, endpoint) from error
            stat = target.stat()
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": _expected_hash(remote)}
            verified[remote.path] = entry
            _write_record(folder, {"repo_id": corpus.repo_id, "commit": commit, "files": verified})
            result.fetched += 1
            result.bytes_fetched += remote.size
        if corpus.unpack and remote.path.endswith(".zip"):
            if not entry.get("unpacked"):
                entry["unpacked"] = [str(path.relative_to(folder)) for path in _unpack(target, folder)]
                _write_record(folder, {"repo_id": corpus.repo_id, "commit": commit, "files": verified})
            result.files += [folder / name for name in entry["unpacked"]]
        else:
            result.files.append(target)
    _write_record(folder, {"repo_id": corpus.repo_id, "commit": commit, "files": verified})
    return result


# ------------------------------------------------------------------------------------------------ what reads it
def _paths_argument(files: list[Path]) -> str:
    """The files as shell words: one glob when a folder's files share a name pattern that matches exactly them
    (the glob is left unquoted so that the shell expands it), else each path."""
    if len(files) > 3 and len({f.parent for f in files}) == 1 and len({f.suffix for f in files}) == 1:
        parent, suffix = files[0].parent, files[0].suffix
        prefix = os.path.commonprefix([f.name for f in files])  # noqa: RUF071  (characters of names, meant)
        pattern = f"{prefix}*{suffix}"
        if sorted(parent.glob(pattern)) == sorted(files) and not any(c in str(parent) for c in "*?["):
            return f"{shlex.quote(str(parent))}/{pattern}"
    return " ".join(shlex.quote(str(f)) for f in files)


def _folder_with(files: list[Path], subfolder: str) -> Path | None:
    """The folder that holds `subfolder`/ among the files' ancestors (a zip may wrap its content in a folder)."""
    for path in files:
        for parent in path.parents:
            if parent.name == subfolder:
                return parent.parent
    return None


def reading_line(corpus: Corpus, folder: Path, files: list[Path]) -> str:
    """The command that reads one corpus's downloaded files: `eval mc` for a benchmark, else `data prepare` into
    the folder its size recipes read (configs/*/24m.yaml): data/pretrain, data/sft, data/preference/NAME."""
    return reading_lines([Downloaded(corpus=corpus, folder=folder, commit="", files=files)])[0]


def _source_words(result: Downloaded) -> str:
    return f"--source {result.corpus.name} {_paths_argument(result.files)}"


def reading_lines(results: list[Downloaded]) -> list[str]:
    """The commands that read what was downloaded. Pretraining corpora share one `data prepare` call (one
    cleaner, so duplicates are found across them, into data/pretrain: what the pretraining recipes read), and so
    do SFT sets (data/sft); each preference set gets its own folder (the reward model reports accuracy per
    folder); a benchmark gets its `eval mc` flag."""
    lines = []
    for kind, output in (("pretrain", "data/pretrain"), ("sft", "data/sft")):
        group = [result for result in results if result.corpus.kind == kind]
        if group:
            tokenizer = " --tokenizer data/tokenizer/chatglm3" if kind == "pretrain" else ""
            sources = " ".join(_source_words(result) for result in group)
            lines.append(f"tinyllm data prepare{tokenizer} --output {output} {sources}")
    for result in results:
        name, folder = result.corpus.name, result.folder
        if result.corpus.kind == "preference":
            lines.append(f"tinyllm data prepare --output data/preference/{name} {_source_words(result)}")
        elif name == "ceval":
            lines.append(f"tinyllm eval mc --model MODEL --ceval-dir {shlex.quote(str(folder))}")
        elif name == "cmmlu":
            root = _folder_with(result.files, "test") or folder
            lines.append(f"tinyllm eval mc --model MODEL --cmmlu-dir {shlex.quote(str(root))}")
    return lines


# ------------------------------------------------------------------------------------------------ --list
def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def on_disk(folder: Path) -> int | None:
    """Bytes under a corpus's folder (finished, partial and unpacked files), None when it is not there."""
    if not folder.is_dir():
        return None
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _matches(corpus: Corpus, relative: str) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in corpus.allow_patterns)


def list_corpora(output: str | Path) -> str:
    """A table of every corpus: kind, hub id, licence, size on the hub, size on disk under `output` and how many
    of its files are verified there."""
    rows = [("name", "kind", "hub id", "licence", "hub size", "on disk", "verified files")]
    for corpus in CORPORA.values():
        folder = Path(output) / corpus.name
        size = on_disk(folder)
        record = _read_record(folder)
        verified = [path for path in record.get("files", {}) if _matches(corpus, path)]
        rows.append(
            (
                corpus.name,
                corpus.kind,
                corpus.repo_id,
                corpus.licence,
                f"~{corpus.approximate_size}",
                "-" if size is None else _human(size),
                str(len(verified)) if verified else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def download_all(names: list[str], output: str | Path, endpoint: str | None = None) -> list[Downloaded]:
    """Every named corpus, names checked before anything is fetched."""
    corpora = [get_corpus(name) for name in names]
    return [download(corpus, output, endpoint) for corpus in corpora]
