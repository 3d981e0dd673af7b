"""The cache of converted GGUF models: convert once, atomically, reuse on later starts.

NOTE: invariants that make a crash at any point safe.
- `<cache>/converted/<name>-<sha16>` only ever appears by renaming a finished
  temporary directory into place, and the marker file inside is written last before
  that rename. So a directory whose marker matches is complete, and nothing else is
  ever reused.
- Temporary directories are named `.<name>-<sha16>.tmp-<pid>-<random>` (and a replaced
  stale conversion `.old-<pid>-<random>`). One whose process is gone is debris from
  a crash, removed on the next conversion into that cache.

    converted/
      SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f/   <- reused: marker matches
        tgi-conversion.json  config.json  model.safetensors  tokenizer.json ...
      .SmolLM2-...-b179c9523d0e6a0f.tmp-4242-x1y2/   <- pid 4242 dead: removed
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from tgi.models import _gguf_convert

logger = logging.getLogger(__name__)

__all__ = ["MARKER_FILE", "converted_dir"]

MARKER_FILE = "tgi-conversion.json"
# Bump when the conversion's output changes, so older caches are rebuilt, not reused.
_FORMAT = 2  # 2: bos/eos/pad from the GGUF metadata, not transformers
_DEBRIS = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)-")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def converted_dir(source: Path, sha: str, cache_root: Path) -> Path:
    """The converted checkpoint of the GGUF `source` (content hash `sha`), made if missing.

    Logs whether it reused an earlier conversion or converted now.
    """
    parent = cache_root / "converted"
    target = parent / f"{_UNSAFE_CHARS.sub('_', source.stem)}-{sha[:16]}"
    stale_reason = _why_not_reusable(target, sha)
    if stale_reason is None:
        logger.info("reusing the conversion of %s at %s", source.name, target)
        return target
    if target.exists():
        logger.warning("not reusing %s: %s; converting again", target, stale_reason)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_debris(parent)
    logger.info(
        "converting %s to a float32 checkpoint at %s (once; later starts reuse it)", source, target
    )
    started_s = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=parent))
    try:
        _gguf_convert.convert_gguf(source, scratch)
        _make_readable(scratch)
        _write_marker(scratch, source, sha)
        _publish(scratch, target, sha)
    finally:
        # After a successful publish `scratch` no longer exists; otherwise it is debris.
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("converted %s in %.1f s", source.name, time.monotonic() - started_s)
    return target


def _marker(source: Path, sha: str) -> dict[str, object]:
    return {
        "format": _FORMAT,
        "sha256": sha,
        "source": str(source),
        # A config.json written by one transformers major may not load in another.
        "transformers": _transformers_version(),
    }


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _write_marker(directory: Path, source: Path, sha: str) -> None:
    text = json.dumps(_marker(source, sha), indent=2) + "\n"
    (directory / MARKER_FILE).write_text(text, encoding="utf-8")


def _why_not_reusable(target: Path, sha: str) -> str | None:
    """None when `target` is a complete conversion of content `sha` by this tgi; else why."""
    marker_path = target / MARKER_FILE
    if not marker_path.is_file():
        return "no conversion marker (absent or unfinished)"
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable marker ({exc})"
    expected = _marker(Path(""), sha)
    for key in ("format", "sha256", "transformers"):
        if marker.get(key) != expected[key]:
            return f"marker {key} is {marker.get(key)!r}, this start needs {expected[key]!r}"
    return None


def _make_readable(directory: Path) -> None:
    """Open up mkdtemp's 0700 (and safetensors' 0600) so other users can share the cache.

    A cache baked into an image by root and read by the serving user is the common case.
    """
    directory.chmod(0o755)
    for entry in directory.rglob("*"):
        entry.chmod(0o755 if entry.is_dir() else 0o644)


def _publish(scratch: Path, target: Path, sha: str) -> None:
    """Rename the finished `scratch` to `target`, replacing a stale `target` if present."""
    try:
        scratch.rename(target)
        return
    except OSError:
        if not target.exists():
            raise
    if _why_not_reusable(target, sha) is None:
        # Another process finished the same conversion first; its result is as good.
        logger.info("%s was converted concurrently by another process; using it", target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    target.rename(aside / target.name)
    scratch.rename(target)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_debris(parent: Path) -> None:
    """Delete temporary directories left by conversions whose process has died."""
    for entry in parent.iterdir():
        match = _DEBRIS.match(entry.name)
        if match is None or not entry.is_dir() or _pid_alive(int(match["pid"])):
            continue
        logger.info("removing %s, left by an interrupted conversion", entry)
        shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own scratch of a conversion running on another thread
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False  # larger than any pid this system can have
    return True
