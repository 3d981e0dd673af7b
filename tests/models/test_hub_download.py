"""Hub ids download through huggingface_hub, tested against a fake hub on loopback.

The fake hub answers the routes huggingface_hub calls: the model API
(`/api/models/{repo}/revision/{rev}`, with siblings and sha), the tree listing
(`/api/models/{repo}/tree/{rev}`) and file resolution (`/{repo}/resolve/{rev}/{file}`,
HEAD and GET, with X-Repo-Commit, ETag and Content-Length). HF_ENDPOINT reaches tgi
through the config's environment, so nothing global is patched but offline mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tgi.config import ServeConfig
from tgi.errors import ModelNotFound
from tgi.models.source import ModelKind, check_model_dir, inspect_model, materialize
from tgi.testing.tiny_models import build_tiny_model

SHA = "1" * 40
SHA_V1 = "2" * 40
TOKEN = "hf_test_token"
# Files a hub repository holds that tgi must not fetch.
DECOYS = {"README.md": b"# tiny\n", "pytorch_model.bin": b"pickle" * 10, "sub/notes.json": b"{}"}


@dataclass
class FakeRepo:
    """One repository: its files, and which commit each ref names."""

    files: dict[str, bytes]
    refs: dict[str, str] = field(default_factory=lambda: {"main": SHA})
    token: str | None = None  # when set, requests without "Bearer <token>" get a 401 (gated)


@dataclass(frozen=True)
class Seen:
    """One request the fake hub answered."""

    method: str
    path: str
    authorization: str | None


class FakeHub:
    """A threading http.server on 127.0.0.1 that serves `repos` as the hub does."""

    def __init__(self, repos: dict[str, FakeRepo]) -> None:
        self.repos = repos
        self.seen: list[Seen] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def file_requests(self) -> list[str]:
        """Names of the files GET through /resolve/, in order."""
        return [
            s.path.split("/resolve/", 1)[1].split("/", 1)[1]
            for s in self.seen
            if s.method == "GET" and "/resolve/" in s.path
        ]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep the test output clean

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.seen.append(Seen(self.command, path, self.headers.get("Authorization")))
            if match := re.fullmatch(
                r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path
            ):
                repo_id, route, revision, _ = match.groups()
                repo, sha = self._repo(repo_id, revision)
                if repo is None or sha is None:
                    return
                if route == "revision":
                    siblings = [{"rfilename": name} for name in sorted(repo.files)]
                    payload: object = {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": sha,
                        "siblings": siblings,
                        "private": False,
                    }
                else:
                    payload = [
                        {"type": "file", "oid": _git_oid(data), "size": len(data), "path": name}
                        for name, data in sorted(repo.files.items())
                    ]
                self._send(
                    200,
                    json.dumps(payload).encode(),
                    body,
                    {"X-Repo-Commit": sha},
                    content_type="application/json",
                )
                return
            if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                repo_id, revision, name = match.groups()
                repo, sha = self._repo(repo_id, revision)
                if repo is None or sha is None:
                    return
                if name not in repo.files:
                    self._send(
                        404, b"", body, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
                    )
                    return
                data = repo.files[name]
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                self._send(200, data, body, {"X-Repo-Commit": sha, "ETag": etag})
                return
            self._send(404, b"", body, {})

        def _repo(self, repo_id: str, revision: str) -> tuple[FakeRepo | None, str | None]:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, b"", True, {"X-Error-Code": "RepoNotFound"})
                return None, None
            if (
                repo.token is not None
                and self.headers.get("Authorization") != f"Bearer {repo.token}"
            ):
                self._send(401, b"", True, {"X-Error-Code": "GatedRepo"})
                return None, None
            sha = repo.refs.get(revision) or (revision if revision in repo.refs.values() else None)
            if sha is None:
                self._send(404, b"", True, {"X-Error-Code": "RevisionNotFound"})
            return repo, sha

        def _send(
            self,
            status: int,
            data: bytes,
            body: bool,
            headers: dict[str, str],
            content_type: str = "application/octet-stream",
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(data)

    return Handler


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _files_of(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE at import: make sure it is off here."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def tiny_files(tiny_llama_source: Path) -> dict[str, bytes]:
    return _files_of(tiny_llama_source)


@pytest.fixture
def fake_hub() -> Iterator[Callable[[dict[str, FakeRepo]], FakeHub]]:
    started: list[FakeHub] = []

    def start(repos: dict[str, FakeRepo]) -> FakeHub:
        hub = FakeHub(repos)
        started.append(hub)
        return hub

    yield start
    for hub in started:
        if hub.thread.is_alive():
            hub.stop()


@pytest.fixture
def hub_config(
    tmp_path: Path, make_config: Callable[..., ServeConfig]
) -> Callable[..., ServeConfig]:
    """A config for `model_id` whose HF_ENDPOINT is `hub` and hub cache tmp_path/hub."""

    def make(
        hub_url: str,
        model_id: str = "org/tiny",
        environ: dict[str, str] | None = None,
        **cli: object,
    ) -> ServeConfig:
        env = {"HF_ENDPOINT": hub_url, **(environ or {})}
        return make_config(
            env, model_id=model_id, huggingface_hub_cache=str(tmp_path / "hub"), **cli
        )

    return make


def test_download_then_resolve_from_cache_without_network(
    tiny_files: dict[str, bytes],
    fake_hub: Callable,
    hub_config: Callable,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = fake_hub({"org/tiny": FakeRepo({**tiny_files, **DECOYS})})
    config = hub_config(hub.url)
    caplog.set_level(logging.INFO, logger="tgi.models.hub")

    info = inspect_model(config)
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SHA
    assert (info.kind, info.location, info.sha) == (ModelKind.HUB_CACHE, snapshot, SHA)
    assert (info.architecture, info.max_position_embeddings) == ("LlamaForCausalLM", 512)
    # inspect reads config.json only; the weights wait for materialize
    assert hub.file_requests() == ["config.json"]
    assert not (snapshot / "model.safetensors").exists()
    assert info.hub_files == tuple(sorted(tiny_files))

    files = materialize(info, config)
    assert files.path == snapshot
    assert (files.kind, files.sha) == (ModelKind.HUB_CACHE, SHA)
    check_model_dir(snapshot)
    assert sorted(hub.file_requests()) == sorted(tiny_files)  # each once, no decoy
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == tiny_files
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    assert tokenizer.decode(tokenizer.encode("Hi")) == "Hi"
    assert (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").read_text() == SHA
    rest = sorted(set(tiny_files) - {"config.json"})
    rest_bytes = sum(len(tiny_files[name]) for name in rest)
    assert (
        f"downloaded org/tiny (revision {SHA}, commit {SHA}): {len(rest)} files, "
        f"{rest_bytes} bytes" in caplog.text
    )
    assert "downloading 1 files of org/tiny (revision main)" in caplog.text

    hub.stop()
    again = inspect_model(config)
    assert (again.location, again.sha, again.hub_files) == (snapshot, SHA, ())
    assert materialize(again, config).path == snapshot


def test_revision_is_sent_and_cached_under_its_ref(
    tiny_files: dict[str, bytes], fake_hub: Callable, hub_config: Callable, tmp_path: Path
) -> None:
    hub = fake_hub({"org/tiny": FakeRepo(tiny_files, refs={"main": SHA, "v1": SHA_V1})})
    config = hub_config(hub.url, revision="v1")
    files = materialize(inspect_model(config), config)
    repo = tmp_path / "hub" / "models--org--tiny"
    assert files.path == repo / "snapshots" / SHA_V1
    assert (repo / "refs" / "v1").read_text() == SHA_V1
    assert not (repo / "refs" / "main").exists()
    assert "/api/models/org/tiny/revision/v1" in [s.path for s in hub.seen]


def test_incomplete_cached_snapshot_is_completed(
    tiny_files: dict[str, bytes], fake_hub: Callable, hub_config: Callable
) -> None:
    hub = fake_hub({"org/tiny": FakeRepo(tiny_files)})
    config = hub_config(hub.url)
    inspect_model(config)  # leaves config.json only, as an interrupted start would
    hub.seen.clear()
    files = materialize(inspect_model(config), config)
    check_model_dir(files.path)
    assert "config.json" not in hub.file_requests()


def test_sharded_repo_fetches_the_indexed_shards_only(
    tmp_path: Path, fake_hub: Callable, hub_config: Callable
) -> None:
    model_dir = build_tiny_model(tmp_path / "sharded", "llama", max_shard_size="100KB")
    repo_files = _files_of(model_dir)
    repo_files["consolidated.safetensors"] = b"not the shards"
    hub = fake_hub({"org/sharded": FakeRepo(repo_files)})
    config = hub_config(hub.url, model_id="org/sharded")
    files = materialize(inspect_model(config), config)
    check_model_dir(files.path)
    assert "consolidated.safetensors" not in hub.file_requests()
    assert len([n for n in hub.file_requests() if n.endswith(".safetensors")]) > 1


@pytest.mark.parametrize("variable", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_token_is_sent(
    tiny_files: dict[str, bytes], fake_hub: Callable, hub_config: Callable, variable: str
) -> None:
    hub = fake_hub({"org/tiny": FakeRepo(tiny_files, token=TOKEN)})
    config = hub_config(hub.url, environ={variable: TOKEN})
    files = materialize(inspect_model(config), config)
    check_model_dir(files.path)
    assert hub.seen
    assert {s.authorization for s in hub.seen} == {f"Bearer {TOKEN}"}


def test_gated_without_token_says_set_hf_token(
    tiny_files: dict[str, bytes], fake_hub: Callable, hub_config: Callable
) -> None:
    hub = fake_hub({"org/tiny": FakeRepo(tiny_files, token=TOKEN)})
    # a token huggingface_hub might find on its own (a stored login) is not TOKEN either
    with pytest.raises(ModelNotFound) as caught:
        inspect_model(hub_config(hub.url))
    message = str(caught.value)
    assert f"hub model 'org/tiny' is gated: accept its conditions at {hub.url}/org/tiny" in message
    assert "HF_TOKEN" in message


def test_wrong_token_says_it_has_no_access(
    tiny_files: dict[str, bytes], fake_hub: Callable, hub_config: Callable
) -> None:
    hub = fake_hub({"org/tiny": FakeRepo(tiny_files, token=TOKEN)})
    with pytest.raises(ModelNotFound, match=re.escape("the token sent (HF_TOKEN) has no access")):
        inspect_model(hub_config(hub.url, environ={"HF_TOKEN": "hf_other"}))


def test_unknown_repo_is_a_clear_404(fake_hub: Callable, hub_config: Callable) -> None:
    hub = fake_hub({})
    with pytest.raises(ModelNotFound) as caught:
        inspect_model(hub_config(hub.url, model_id="org/absent"))
    assert str(caught.value).startswith(
        f"hub model 'org/absent' was not found at {hub.url} (HTTP 404): check the id; if the "
        "repository is private, set HF_TOKEN (or HUGGING_FACE_HUB_TOKEN)"
    )


def test_unknown_revision(
    tiny_files: dict[str, bytes], fake_hub: Callable, hub_config: Callable
) -> None:
    hub = fake_hub({"org/tiny": FakeRepo(tiny_files)})
    with pytest.raises(ModelNotFound, match=re.escape("has no revision 'v9' at")):
        inspect_model(hub_config(hub.url, revision="v9"))


def test_bin_only_repo_is_refused_before_any_download(
    tiny_files: dict[str, bytes], fake_hub: Callable, hub_config: Callable
) -> None:
    repo_files = {n: d for n, d in tiny_files.items() if not n.endswith(".safetensors")}
    repo_files["pytorch_model.bin"] = b"pickle"
    hub = fake_hub({"org/pickled": FakeRepo(repo_files)})
    with pytest.raises(ModelNotFound) as caught:
        inspect_model(hub_config(hub.url, model_id="org/pickled"))
    message = str(caught.value)
    assert (
        "hub model 'org/pickled' (revision main) has only PyTorch weights (pytorch_model.bin)"
        in message
    )
    assert "safetensors only" in message
    assert "--revision" in message
    assert hub.file_requests() == []


def test_gguf_only_repo_points_at_the_gguf(fake_hub: Callable, hub_config: Callable) -> None:
    hub = fake_hub({"org/quant": FakeRepo({"model.Q4_0.gguf": b"GGUF", "README.md": b""})})
    with pytest.raises(ModelNotFound, match=re.escape("holds GGUF files: pass one as --model-id")):
        inspect_model(hub_config(hub.url, model_id="org/quant"))


def test_unreachable_hub_is_a_clear_error(
    fake_hub: Callable, hub_config: Callable, tmp_path: Path
) -> None:
    hub = fake_hub({})
    hub.stop()  # nothing listens on its port any more
    with pytest.raises(ModelNotFound) as caught:
        inspect_model(hub_config(hub.url))
    message = str(caught.value)
    assert f"is not in the Hugging Face cache at {tmp_path / 'hub'}" in message
    assert f"the hub at {hub.url} cannot be reached" in message
    assert "HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize("value", ["1", "true"])
def test_offline_keeps_the_cache_only_message(
    tiny_files: dict[str, bytes], fake_hub: Callable, hub_config: Callable, value: str
) -> None:
    hub = fake_hub({"org/tiny": FakeRepo(tiny_files)})
    with pytest.raises(ModelNotFound) as caught:
        inspect_model(hub_config(hub.url, environ={"HF_HUB_OFFLINE": value}))
    assert "tgi does not download models at start-up here" in str(caught.value)
    assert hub.seen == []


def test_copying_a_snapshot_elsewhere_still_resolves_offline(
    tiny_files: dict[str, bytes],
    fake_hub: Callable,
    hub_config: Callable,
    tmp_path: Path,
    make_config: Callable,
) -> None:
    """A cache filled online serves a machine without network (HF_HUB_OFFLINE=1)."""
    hub = fake_hub({"org/tiny": FakeRepo({**tiny_files, **DECOYS})})
    config = hub_config(hub.url)
    materialize(inspect_model(config), config)
    hub.stop()
    copied = Path(shutil.copytree(tmp_path / "hub", tmp_path / "mounted", symlinks=True))
    offline = make_config(
        {"HF_HUB_OFFLINE": "1"}, model_id="org/tiny", huggingface_hub_cache=str(copied)
    )
    info = inspect_model(offline)
    assert info.location == copied / "models--org--tiny" / "snapshots" / SHA
    assert info.hub_files == ()
