"""Signed run folders: ``manifest.json`` with the sha256 and size of every artifact.

``write_manifest(run_dir)`` records every regular file of a run folder except
``manifest.json`` itself, temporary files of atomic writes (``*.tmp``), lock files (``*.lock``,
raydistill/locks.py) and ``ray_train/`` (Ray Train's own checkpoint storage, rewritten by Ray while a
stage runs), plus the sha256 of the resolved config. ``verify_run`` lists what is missing, truncated
or modified; ``verify_file`` checks one file before it is loaded and raises ``IntegrityError``.
Files that are not in the manifest are allowed (a user may add notes to a run folder).

Signing: when the environment variable ``RAYDISTILL_SIGNING_KEY`` is set, the manifest
carries ``hmac_sha256`` (HMAC-SHA256 of its canonical JSON under that key) and every
verification checks it, so editing the manifest itself is detected too. Without the key
the manifest still detects accidental corruption and stale files, but not a deliberate
edit of both a file and its manifest entry. With a key set, an unsigned manifest is
refused; a signed manifest read without the key has its files checked but not its
signature (``cmd_verify`` says so).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from raydistill.errors import IntegrityError

__all__ = [
    "MANIFEST_NAME",
    "SIGNING_KEY_ENV",
    "IntegrityError",
    "add_verify_parser",
    "canonical_json",
    "cmd_verify",
    "read_manifest",
    "sha256_file",
    "verify_file",
    "verify_run",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
SIGNING_KEY_ENV = "RAYDISTILL_SIGNING_KEY"
EXCLUDED_DIRS = ("ray_train", "mlflow", "tensorboard")  # Ray Train's storage; track.TRACKING_DIRS (logs)
FORMAT = "raydistill-manifest/1"
_FIX = "rerun the stage or restore the file"




def _version() -> str:
    from raydistill import __version__

    return __version__


def digest(*parts: Any) -> str:
    """sha256 of JSON-able ``parts`` (keys sorted): the stage keys and run names are made with it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(data: Any) -> bytes:
    """Stable bytes for hashing and signing: sorted keys, no whitespace."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def _signing_key() -> bytes | None:
    key = os.environ.get(SIGNING_KEY_ENV)
    return key.encode() if key else None


def _signature(manifest: dict, key: bytes) -> str:
    unsigned = {k: v for k, v in manifest.items() if k != "hmac_sha256"}
    return hmac.new(key, canonical_json(unsigned), hashlib.sha256).hexdigest()


def _is_recorded(relpath: str) -> bool:
    """Whether a file (POSIX path relative to the run folder) belongs in the manifest."""
    parts = relpath.split("/")
    return not (relpath == MANIFEST_NAME or parts[0] in EXCLUDED_DIRS or parts[-1].endswith((".tmp", ".lock")))


def _run_files(run_dir: Path) -> list[str]:
    """Relative POSIX paths of the regular files to record (symlinks are skipped, not followed)."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        rel_root = Path(root).relative_to(run_dir)
        dirs[:] = sorted(d for d in dirs if not (rel_root == Path(".") and d in EXCLUDED_DIRS))
        for name in files:
            path = Path(root) / name
            rel = (rel_root / name).as_posix()
            if path.is_file() and not path.is_symlink() and _is_recorded(rel):
                found.append(rel)
    return sorted(found)


def _relative(run_dir: Path, artifact: str | os.PathLike) -> str:
    path = Path(artifact)
    full = (path if path.is_absolute() else run_dir / path).resolve()
    try:
        rel = full.relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        raise IntegrityError(f"artifact {artifact} is outside the run folder {run_dir}; "
                         "record only files inside it") from None
    if not full.is_file():
        raise IntegrityError(f"artifact {artifact} does not exist in {run_dir}; write it before recording it")
    return rel


def read_manifest(run_dir: str | os.PathLike) -> dict | None:
    """The parsed manifest of ``run_dir``, or None when it has none; IntegrityError if unreadable."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON ({e}); rerun the pipeline to rewrite it") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path} is not a raydistill manifest (not an object); rerun the pipeline to rewrite it")
    if manifest.get("format") == FORMAT and not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{path} is not a raydistill manifest (no 'files'); rerun the pipeline to rewrite it")
    return manifest


def write_manifest(run_dir: str | os.PathLike, artifacts: list[str] | None = None,
                   config: dict | None = None) -> dict:
    """Write ``run_dir/manifest.json`` atomically and return it.

    ``artifacts=None`` records every regular file of the folder (see the module doc for
    what is skipped). A list of paths (relative to ``run_dir`` or absolute inside it)
    re-hashes only those and keeps the other entries of an existing manifest as they are,
    so recording a freshly written checkpoint never blesses an unrelated file that was
    modified meanwhile. ``config`` (the resolved config as a dict) is stored as its
    sha256; without it an existing manifest's ``config_sha256`` is kept.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IntegrityError(f"run folder {run_dir} does not exist; pass the folder a run wrote")
    previous = read_manifest(run_dir)
    if previous is not None and previous.get("format") != FORMAT:
        raise IntegrityError(f"{run_dir / MANIFEST_NAME} was not written by raydistill; move it out of the run folder")
    # A full rescan replaces every entry; a list of artifacts updates just those.
    files: dict[str, dict] = dict(previous["files"]) if previous and artifacts is not None else {}
    relpaths = _run_files(run_dir) if artifacts is None else [_relative(run_dir, a) for a in artifacts]
    for rel in relpaths:
        path = run_dir / rel
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if config is not None:
        config_sha = hashlib.sha256(canonical_json(config)).hexdigest()
    else:
        config_sha = previous.get("config_sha256") if previous else None
    manifest: dict[str, Any] = {"format": FORMAT, "created_by": f"raydistill {_version()}",
                                "config_sha256": config_sha, "files": dict(sorted(files.items()))}
    key = _signing_key()
    if key:
        manifest["hmac_sha256"] = _signature(manifest, key)
    # imported here: checkpoints imports torch, and the CLI imports this module to build its parser (every
    # command, `--help` and a mistyped key included, would pay torch's ~2 s import before its first line)
    from raydistill.checkpoints import atomic_write_bytes

    atomic_write_bytes(run_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    return manifest


def _signature_problem(manifest: dict, where: Path) -> str | None:
    key = _signing_key()
    if key is None:
        return None
    recorded = manifest.get("hmac_sha256")
    if not recorded:
        return (f"{where} is not signed but {SIGNING_KEY_ENV} is set; rerun the pipeline with the key "
                "to sign it, or unset the key")
    if not hmac.compare_digest(str(recorded), _signature(manifest, key)):
        return (f"{where} was modified or signed with another key (hmac_sha256 mismatch); "
                "restore the run folder or rerun the pipeline")
    return None


def _file_problem(run_dir: Path, rel: str, entry: Any) -> str | None:
    path = run_dir / rel
    if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
        return f"{path}: malformed manifest entry; rerun the pipeline to rewrite {MANIFEST_NAME}"
    if not path.is_file():
        return f"{path} is missing (listed in {MANIFEST_NAME}); {_FIX}"
    size = path.stat().st_size
    if size < entry["bytes"]:
        return f"{path} is truncated ({size} of {entry['bytes']} bytes); {_FIX}"
    if size != entry["bytes"]:
        return f"{path} was modified after the run ({size} bytes, manifest says {entry['bytes']}); {_FIX}"
    if sha256_file(path) != entry["sha256"]:
        return f"{path} was modified after the run (sha256 mismatch); {_FIX}"
    return None


def verify_run(run_dir: str | os.PathLike) -> list[str]:
    """Problems of a run folder against its manifest (empty list: every recorded file is intact).

    Reports a missing manifest, a bad signature (when ``RAYDISTILL_SIGNING_KEY`` is set),
    and each recorded file that is missing, truncated or modified. Extra files are fine.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return [f"run folder {run_dir} does not exist; pass the folder a run wrote"]
    try:
        manifest = read_manifest(run_dir)
    except IntegrityError as e:
        return [str(e)]
    if manifest is None:
        return [f"{run_dir} has no {MANIFEST_NAME}; rerun the pipeline to write one"]
    if manifest.get("format") != FORMAT:
        return [f"{run_dir / MANIFEST_NAME} is not a raydistill manifest (format {manifest.get('format')!r}); "
                "rerun the pipeline to write one"]
    problems = []
    signature = _signature_problem(manifest, run_dir / MANIFEST_NAME)
    if signature:
        problems.append(signature)
    for rel, entry in manifest["files"].items():
        problem = _file_problem(run_dir, rel, entry)
        if problem:
            problems.append(problem)
    return problems


def _find_manifest(path: Path) -> tuple[Path, dict] | None:
    """The nearest folder at or above ``path``'s folder holding a raydistill manifest, and that manifest.

    Stops at the first ``manifest.json``: one written by another tool (no raydistill
    ``format``) means the file is not in a raydistill run folder.
    """
    for folder in [path.parent, *path.parent.parents]:
        if (folder / MANIFEST_NAME).is_file():
            manifest = read_manifest(folder)
            return (folder, manifest) if manifest and manifest.get("format") == FORMAT else None
    return None


def verify_file(path: str | os.PathLike) -> bool:
    """Check one file against the nearest manifest before loading it.

    Returns True when the file is recorded and intact, False when no manifest covers it
    (no manifest.json in its folder or above, or not listed there: a user's own checkpoint
    outside run folders loads as before). Raises ``IntegrityError`` with a one-line message
    naming the file and the fix when it is missing, truncated, modified, or the manifest's
    signature does not verify.
    """
    path = Path(path).absolute()
    found = _find_manifest(path)
    if found is None:
        return False
    run_dir, manifest = found
    rel = path.relative_to(run_dir).as_posix()
    if rel not in manifest["files"]:
        return False
    signature = _signature_problem(manifest, run_dir / MANIFEST_NAME)
    if signature:
        raise IntegrityError(f"cannot trust {path}: {signature}")
    problem = _file_problem(run_dir, rel, manifest["files"][rel])
    if problem:
        raise IntegrityError(problem)
    return True


# ---- CLI: raydistill verify DIR -----------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    """``raydistill verify DIR``: print ``OK: N files verified`` (exit 0) or each problem (exit 2)."""
    run_dir = Path(args.dir)
    problems = verify_run(run_dir)
    if problems:
        for problem in problems:
            print(problem)
        return 2
    manifest = read_manifest(run_dir) or {"files": {}}
    signed = "hmac_sha256" in manifest
    note = ""
    if signed and _signing_key() is None:
        note = f" (manifest is signed; set {SIGNING_KEY_ENV} to check the signature too)"
    elif signed:
        note = " (signature verified)"
    print(f"OK: {len(manifest['files'])} files verified{note}")
    return 0


def add_verify_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``verify DIR`` on the CLI's subparsers (``set_defaults(func=cmd_verify)``)."""
    parser = subparsers.add_parser(
        "verify", help="check a run folder against its manifest (sha256 of every artifact)",
        description="Check every file recorded in DIR/manifest.json (missing, truncated, modified) and, "
                    f"when {SIGNING_KEY_ENV} is set, the manifest's HMAC signature. Exit 0 when intact, 2 otherwise.")
    parser.add_argument("dir", metavar="DIR", help="run folder (holds manifest.json)")
    parser.set_defaults(func=cmd_verify)
    return parser
