"""A party's deployed models, encrypted at rest with AES-256-GCM.

One file per (name, version): ``<data_dir>/models/<name>/<version>.sim``. Layout:
``b"SIM1" | u32 header length | header JSON | 12-byte nonce | ciphertext``; the header
(name, version, deployment id, creation time — nothing secret) is the GCM associated data,
so it cannot be altered without detection; the ciphertext holds the graph, this party's
weight shares, its fixed-mask seed, the deployment's seed nonce (which re-registers it
with a restarted dealer) and the opened mask differences ``E``. The key is the party's
32-byte ``storage_key`` file.

Deployment ids are single-use on a party, durably: every id this party ever accepted a
deploy for has a *tombstone* ``<data_dir>/deployments/<id>`` (created with ``O_EXCL``,
fsync'd with its directory, never deleted -- not by :meth:`ModelStore.remove`, nor by a
``replace``), and :meth:`ModelStore.claim_deployment` refuses an id that has one. A
tombstone holds only public facts (id, name, version, time).

Writes go to a temporary file that is fsync'd and renamed over the target, so a crash or
a full disk leaves the previous version intact; an error says what failed.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secureinfer.dealer.material import PartyBundle
from secureinfer.dealer.wire import bundle_from_bytes, bundle_to_bytes
from secureinfer.errors import AlreadyExistsError, ConfigError, IntegrityError, InvalidArgumentError, NotFoundError, SecureInferError

__all__ = ["ModelRecord", "ModelStore"]

_MAGIC = b"SIM1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DEPLOYMENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NONCE_BLOB = "seed_nonce"


def _fsync_dir(path: Path) -> None:
    """Make a directory entry (a created or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_name(kind: str, value: str) -> str:
    if not _NAME_RE.match(value or ""):
        raise InvalidArgumentError(f"{kind} {value!r} must match {_NAME_RE.pattern}")
    return value


@dataclass
class ModelRecord:
    name: str
    version: str
    deployment_id: str
    created: str
    graph_json: bytes
    model_seed: bytes
    shares: dict[str, torch.Tensor]
    diffs: dict[str, torch.Tensor]
    parameters: dict[str, str] = field(default_factory=dict)  # public deploy parameters (e.g. DP policy)
    seed_nonce: bytes = b""  # the dealer's nonce of this deployment's seeds (empty: stored before nonces)


class ModelStore:
    def __init__(self, data_dir: Path, storage_key_path: Path) -> None:
        self.root = Path(data_dir) / "models"
        self.tombstones = Path(data_dir) / "deployments"
        try:
            key = Path(storage_key_path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read storage key {storage_key_path}: {exc}") from None
        if len(key) != 32:
            raise ConfigError(f"storage key {storage_key_path} must hold 32 bytes, has {len(key)}")
        self._aead = AESGCM(key)

    def _path(self, name: str, version: str) -> Path:
        return self.root / check_name("model name", name) / f"{check_name('version', version)}.sim"

    def exists(self, name: str, version: str) -> bool:
        return self._path(name, version).exists()

    def versions(self, name: str) -> list[str]:
        d = self.root / name
        return sorted(p.stem for p in d.glob("*.sim")) if d.is_dir() else []

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def save(self, rec: ModelRecord, *, replace: bool) -> None:
        path = self._path(rec.name, rec.version)
        if path.exists() and not replace:
            raise AlreadyExistsError(f"model {rec.name} version {rec.version} exists; deploy with replace to overwrite")
        header = json.dumps(
            {"name": rec.name, "version": rec.version, "deployment_id": rec.deployment_id, "created": rec.created,
             "parameters": rec.parameters},
            sort_keys=True,
        ).encode()
        blobs = {"graph": rec.graph_json, **({_NONCE_BLOB: rec.seed_nonce} if rec.seed_nonce else {})}
        body = PartyBundle(0, rec.model_seed, {**{f"w/{k}": v for k, v in rec.shares.items()},
                                               **{f"e/{k}": v for k, v in rec.diffs.items()}},
                           blobs)
        nonce = os.urandom(12)
        blob = _MAGIC + struct.pack("<I", len(header)) + header + nonce + self._aead.encrypt(nonce, bundle_to_bytes(body), header)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SecureInferError(f"cannot store model {rec.name}/{rec.version} in {path.parent}: {exc}") from exc

    def load(self, name: str, version: str) -> ModelRecord:
        path = self._path(name, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"model {name} version {version} not found") from None
        if data[:4] != _MAGIC or len(data) < 8:
            raise IntegrityError(f"{path} is not a secureinfer model file")
        (hlen,) = struct.unpack("<I", data[4:8])
        header = data[8 : 8 + hlen]
        nonce = data[8 + hlen : 20 + hlen]
        try:
            plain = self._aead.decrypt(nonce, data[20 + hlen :], header)
        except InvalidTag:
            raise IntegrityError(f"{path} failed authentication (wrong storage key or tampered file)") from None
        meta = json.loads(header)
        b = bundle_from_bytes(plain, party_id=0)
        return ModelRecord(
            name=meta["name"], version=meta["version"], deployment_id=meta["deployment_id"], created=meta["created"],
            graph_json=b.blobs["graph"], model_seed=b.seed,
            shares={k[2:]: v for k, v in b.tensors.items() if k.startswith("w/")},
            diffs={k[2:]: v for k, v in b.tensors.items() if k.startswith("e/")},
            parameters=dict(meta.get("parameters", {})),
            seed_nonce=b.blobs.get(_NONCE_BLOB, b""),
        )

    def remove(self, name: str, version: str) -> None:
        """Delete the model file; its deployment id's tombstone stays (the id stays used)."""
        path = self._path(name, version)
        if not path.exists():
            raise NotFoundError(f"model {name} version {version} not found")
        path.unlink()

    # ------------------------------------------------------------------ deployment ids
    def _tombstone(self, deployment_id: str) -> Path:
        if not isinstance(deployment_id, str) or not _DEPLOYMENT_RE.match(deployment_id):
            raise InvalidArgumentError(f"deployment id {deployment_id!r} must match {_DEPLOYMENT_RE.pattern}")
        return self.tombstones / deployment_id

    def deployment_used(self, deployment_id: str) -> bool:
        """Whether this party ever claimed ``deployment_id`` (deployed, removed or not)."""
        return self._tombstone(deployment_id).exists()

    def claim_deployment(self, deployment_id: str, *, name: str, version: str, exist_ok: bool = False) -> bool:
        """Record ``deployment_id`` as used, durably, before anything is done under it.

        Returns True if this call created the tombstone. An id that already has one is
        refused with :class:`~secureinfer.errors.AlreadyExistsError` (ALREADY_EXISTS),
        whatever model it belonged to and whether or not that model was removed, unless
        ``exist_ok`` (used to backfill tombstones of stored models). Atomic across
        threads and processes (``O_CREAT | O_EXCL``): of two concurrent claims of one id
        exactly one succeeds. A crash after the file was created leaves the id claimed.
        """
        path = self._tombstone(deployment_id)
        try:
            if not self.tombstones.is_dir():
                self.tombstones.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.tombstones.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if exist_ok:
                return False
            raise AlreadyExistsError(
                f"deployment id {deployment_id} was already used on this party; deploy with a fresh deployment id"
            ) from None
        except OSError as exc:
            raise SecureInferError(f"cannot record deployment id {deployment_id} in {self.tombstones}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps({"deployment_id": deployment_id, "name": name, "version": version,
                                     "claimed": self.now()}, sort_keys=True).encode())
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(self.tombstones)
        except OSError as exc:  # the id stays claimed (fail closed): the file exists
            raise SecureInferError(f"cannot record deployment id {deployment_id} in {self.tombstones}: {exc}") from exc
        return True

    @staticmethod
    def now() -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
