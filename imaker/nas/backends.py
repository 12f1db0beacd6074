"""Sync backends, chosen by the destination: a mounted path, the rsync binary, SFTP, S3.

Every backend
* ``check()``s that the destination is reachable and its remote root exists (an unmounted
  share is never replaced by a fresh local folder),
* ``compare()``s a remote file with a local one: ``missing`` | ``same`` | ``different``,
* ``put()``s a file so that it lands atomically under its final name (temporary name in the
  same folder + rename; S3 objects appear whole by nature; rsync does its own temp + rename)
  and verifies it (size + sha256, or rsync's whole-file checksum) before reporting success.

Credentials come from the environment variables named in the options (``*_env``) or from
the libraries' own environment (``AWS_*``); they are never put in messages or logs.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import secrets
import shlex
import socket
import stat
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from ..fsutil import fsync_dir
from .config import Destination
from .errors import DestinationUnavailable, SyncError

CHUNK_SIZE = 1 << 20
MISSING, SAME, DIFFERENT = "missing", "same", "different"
TEMP_MARK = ".imaker-"


def temp_name(final_name: str) -> str:
    """Hidden, unmistakable temporary name beside the final file."""
    return f".{final_name}{TEMP_MARK}{secrets.token_hex(4)}.part"


def is_temp_for(name: str, final_name: str) -> bool:
    return name.startswith(f".{final_name}{TEMP_MARK}") and name.endswith(".part")


def _copy_stream(src: BinaryIO, dst: Any, digest) -> int:
    """Copy ``src`` to ``dst`` in chunks, feeding ``digest``; returns the bytes copied."""
    total = 0
    while block := src.read(CHUNK_SIZE):
        dst.write(block)
        digest.update(block)
        total += len(block)
    return total


def _os_message(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


class Backend:
    name = "?"

    def __init__(self, dest: Destination, options: dict[str, Any]):
        self.dest = dest
        self.options = options
        self._checked = False

    # a target is a path relative to dest.path, "/"-separated
    def url(self, rel: str) -> str:
        return self.dest.url(rel)

    def ensure_checked(self) -> None:
        if not self._checked:
            self.check()
            self._checked = True

    def check(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compare(self, rel: str, size: int, sha256: str, *, deep: bool = True,
                local: Path | None = None) -> str:
        raise NotImplementedError  # pragma: no cover

    def put(self, local: Path, rel: str, size: int, sha256: str) -> int:
        raise NotImplementedError  # pragma: no cover

    def close(self) -> None:
        pass


def _env_secret(options: dict[str, Any], key: str) -> str | None:
    """The value of the environment variable named by ``options[key]`` (``*_env``)."""
    name = options.get(key)
    if not name:
        return None
    value = os.environ.get(name)
    if value is None:
        raise SyncError(f"environment variable {name} (named by {key}) is not set")
    return value


# ---------------------------------------------------------------------------------------
class LocalBackend(Backend):
    """A mounted NAS path (or any local folder)."""

    name = "local"

    def _root(self) -> Path:
        return Path(self.dest.root or str(Path(self.dest.path).parent))

    def check(self) -> None:
        root = self._root()
        if not root.is_dir():
            if self.options.get("create_root"):
                root.mkdir(parents=True, exist_ok=True)
            else:
                raise DestinationUnavailable(
                    f"destination root {root} does not exist or is not a folder "
                    f"(is the NAS mounted?)")
        try:
            Path(self.dest.path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SyncError(f"cannot create {self.dest.path}: {_os_message(exc)}") from None

    def _final(self, rel: str) -> Path:
        return Path(self.dest.path) / rel

    def compare(self, rel: str, size: int, sha256: str, *, deep: bool = True,
                local: Path | None = None) -> str:
        final = self._final(rel)
        try:
            st = final.stat()
        except FileNotFoundError:
            return MISSING
        except OSError as exc:
            raise SyncError(f"cannot read {final}: {_os_message(exc)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise SyncError(f"{final} exists and is not a regular file")
        if st.st_size != size:
            return DIFFERENT
        if not deep:
            return SAME
        digest = hashlib.sha256()
        with open(final, "rb") as fh:
            while block := fh.read(CHUNK_SIZE):
                digest.update(block)
        return SAME if digest.hexdigest() == sha256 else DIFFERENT

    def put(self, local: Path, rel: str, size: int, sha256: str) -> int:
        final = self._final(rel)
        tmp = final.parent / temp_name(final.name)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            for old in final.parent.iterdir():  # leftovers of a copy that was killed
                if is_temp_for(old.name, final.name):
                    old.unlink(missing_ok=True)
            digest = hashlib.sha256()
            with open(local, "rb") as src, open(tmp, "xb") as dst:
                sent = _copy_stream(src, dst, digest)
                dst.flush()
                os.fsync(dst.fileno())
            if sent != size or digest.hexdigest() != sha256:
                raise SyncError(f"{local} changed while it was copied (expected {size} bytes, "
                                f"sha256 {sha256[:12]}…)")
            check = hashlib.sha256()  # verify what is on the destination, not what we sent
            with open(tmp, "rb") as fh:
                while block := fh.read(CHUNK_SIZE):
                    check.update(block)
            if tmp.stat().st_size != size or check.hexdigest() != sha256:
                raise SyncError(f"verification failed for {final}: the copy does not match")
            os.replace(tmp, final)
            fsync_dir(final.parent)
            return sent
        except OSError as exc:
            raise SyncError(f"cannot write {final}: {_os_message(exc)}") from None
        finally:
            if tmp.exists():
                tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
_RSYNC_UNREACHABLE = {5, 10, 12, 30, 35, 255}


class RsyncBackend(Backend):
    """The real ``rsync`` binary (list-form arguments, never a shell): to a local path,
    an rsync daemon (``rsync://``) or over ssh (``host:path``). rsync writes to a hidden
    temporary file and renames it; ``--checksum`` makes re-runs transfer nothing."""

    name = "rsync"

    def __init__(self, dest: Destination, options: dict[str, Any]):
        super().__init__(dest, options)
        self.binary = options.get("binary", "rsync")

    # ----- argument building ------------------------------------------------------
    def _spec(self, path: str) -> str:
        d = self.dest
        who = f"{d.user}@" if d.user else ""
        if d.style == "daemon":
            port = f":{d.port}" if d.port else ""
            return f"rsync://{who}{d.host}{port}/{d.module}/{path.lstrip('/')}"
        if d.style == "ssh":
            return f"{who}{d.host}:{path}"
        return path

    def _target(self, rel: str) -> str:
        return self._spec(str(PurePosixPath(self.dest.path) / rel))

    def _base(self) -> tuple[list[str], dict[str, str]]:
        timeout = int(self.options.get("timeout", 30))
        args = [self.binary, "--checksum", "--times", "--mkpath", f"--timeout={timeout}"]
        env = dict(os.environ)
        env.pop("RSYNC_PASSWORD", None)
        if self.dest.style == "daemon":
            args.append(f"--contimeout={timeout}")
            password = _env_secret(self.options, "password_env")
            if password is not None:
                env["RSYNC_PASSWORD"] = password  # rsync reads it from the environment
        elif self.dest.style == "ssh":
            ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}"]
            port = self.options.get("port") or self.dest.port
            if port:
                ssh += ["-p", str(port)]
            if self.options.get("user"):
                ssh += ["-l", self.options["user"]]
            if self.options.get("ssh_key_file"):
                ssh += ["-i", self.options["ssh_key_file"], "-o", "IdentitiesOnly=yes"]
            if self.options.get("known_hosts"):
                ssh += ["-o", f"UserKnownHostsFile={self.options['known_hosts']}",
                        "-o", "StrictHostKeyChecking=yes"]
            # rsync splits -e itself (quotes allowed); no shell is involved
            args += ["-e", " ".join(shlex.quote(a) for a in ssh)]
        if self.options.get("bwlimit"):
            args.append(f"--bwlimit={int(self.options['bwlimit'])}")
        args += list(self.options.get("extra_args", []))
        return args, env

    def _run(self, args: list[str], env: dict[str, str], what: str) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(args, env=env, capture_output=True, text=True,
                                  timeout=int(self.options.get("timeout", 30)) * 20)
        except FileNotFoundError:
            raise SyncError(f"the rsync binary ({self.binary}) is not installed") from None
        except subprocess.TimeoutExpired:
            raise DestinationUnavailable(f"rsync to {what} timed out") from None
        if proc.returncode != 0:
            detail = " ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:])
            cls = DestinationUnavailable if proc.returncode in _RSYNC_UNREACHABLE else SyncError
            raise cls(f"rsync to {what} failed (exit {proc.returncode}): {detail}")
        return proc

    # ----- operations --------------------------------------------------------------
    def check(self) -> None:
        root = self.dest.root or str(PurePosixPath(self.dest.path).parent)
        if self.dest.style == "local":
            if not Path(root).is_dir():
                if self.options.get("create_root"):
                    Path(root).mkdir(parents=True, exist_ok=True)
                else:
                    raise DestinationUnavailable(
                        f"destination root {root} does not exist or is not a folder "
                        f"(is the NAS mounted?)")
            return
        args, env = self._base()
        spec = self._spec(root.rstrip("/") + "/")
        try:
            self._run(args + ["--list-only", "--dirs", spec], env, self.dest.url())
        except SyncError as exc:
            if isinstance(exc, DestinationUnavailable):
                raise
            raise DestinationUnavailable(f"destination root {self.dest.url()} is not "
                                         f"available: {exc}") from None

    def _itemize(self, local: Path, rel: str, *, dry_run: bool) -> tuple[list[str], int]:
        args, env = self._base()
        args += ["--out-format=%i|%b|%n"]
        if dry_run:
            args.append("--dry-run")
        proc = self._run(args + [str(local), self._target(rel)], env, self.url(rel))
        changes, sent = [], 0
        for line in proc.stdout.splitlines():
            parts = line.split("|", 2)
            if len(parts) != 3:
                continue
            flags, nbytes = parts[0], parts[1]
            if flags[:1] in "<>" and flags[1:2] == "f":
                changes.append(flags)
                if nbytes.isdigit():
                    sent += int(nbytes)
        return changes, sent

    def compare(self, rel: str, size: int, sha256: str, *, deep: bool = True,
                local: Path | None = None) -> str:
        if local is None:
            raise SyncError("rsync compares against the local file")
        changes, _ = self._itemize(local, rel, dry_run=True)
        if not changes:
            return SAME
        return MISSING if "+++++++" in changes[0] else DIFFERENT

    def put(self, local: Path, rel: str, size: int, sha256: str) -> int:
        _, _sent = self._itemize(local, rel, dry_run=False)
        # verification: rsync checks each transfer with a whole-file checksum; a second
        # --checksum pass proves the destination now holds the same bytes.
        if self.compare(rel, size, sha256, local=local) != SAME:
            raise SyncError(f"verification failed for {self.url(rel)}: rsync still sees a "
                            f"difference after the transfer")
        return _sent


# ---------------------------------------------------------------------------------------
class SftpBackend(Backend):
    """SSH file transfer with paramiko: temp name, read-back sha256, posix-rename."""

    name = "sftp"

    def __init__(self, dest: Destination, options: dict[str, Any]):
        super().__init__(dest, options)
        self._client = None
        self._sftp = None

    def _connect(self):
        if self._sftp is not None:
            return self._sftp
        import paramiko

        host, port = self.dest.host, int(self.options.get("port") or self.dest.port or 22)
        user = self.options.get("user") or self.dest.user
        where = f"sftp://{user + '@' if user else ''}{host}:{port}"
        client = paramiko.SSHClient()
        known = self.options.get("known_hosts")
        try:
            if known:
                client.load_host_keys(os.path.expanduser(known))
            else:
                client.load_system_host_keys()
        except OSError as exc:
            raise SyncError(f"cannot read known_hosts {known}: {exc.strerror}") from None
        if self.options.get("strict_host_key_checking", True):
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        key_file = self.options.get("key_file") or _env_secret(self.options, "key_file_env")
        password = _env_secret(self.options, "password_env")
        timeout = float(self.options.get("timeout", 15))
        try:
            client.connect(host, port=port, username=user, key_filename=key_file,
                           password=password, timeout=timeout, banner_timeout=timeout,
                           auth_timeout=timeout, allow_agent=not (key_file or password),
                           look_for_keys=not (key_file or password))
        except paramiko.BadHostKeyException:
            client.close()
            raise SyncError(f"host key of {where} does not match known_hosts "
                            f"(refusing to connect)") from None
        except paramiko.AuthenticationException:
            client.close()
            raise DestinationUnavailable(f"authentication failed for {where} (check "
                                         f"key_file / password_env)") from None
        except paramiko.SSHException as exc:
            client.close()
            msg = str(exc)
            if "not found in known_hosts" in msg:
                raise SyncError(f"host key of {where} is not in known_hosts (add it, or set "
                                f"known_hosts in the sftp options)") from None
            raise DestinationUnavailable(f"cannot connect to {where}: {msg}") from None
        except (OSError, socket.timeout) as exc:
            client.close()
            inner = list(getattr(exc, "errors", {}).values())  # NoValidConnectionsError
            first = inner[0] if inner else exc
            reason = getattr(first, "strerror", None) or str(first) or type(first).__name__
            raise DestinationUnavailable(f"cannot connect to {where}: {reason}") from None
        self._client = client
        self._sftp = client.open_sftp()
        self._sftp.get_channel().settimeout(timeout * 4)
        return self._sftp

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = self._sftp = None

    def _path(self, rel: str) -> str:
        return str(PurePosixPath(self.dest.path) / rel)

    def _mkdirs(self, sftp, path: str) -> None:
        parts = PurePosixPath(path).parts
        cur = PurePosixPath(parts[0])
        for part in parts[1:]:
            cur = cur / part
            try:
                sftp.stat(str(cur))
            except FileNotFoundError:
                try:
                    sftp.mkdir(str(cur))
                except OSError as exc:
                    raise SyncError(f"cannot create {self.dest.url()}: "
                                    f"{_sftp_message(exc)}") from None

    def check(self) -> None:
        sftp = self._connect()
        root = self.dest.root or str(PurePosixPath(self.dest.path).parent)
        try:
            st = sftp.stat(root)
            if not stat.S_ISDIR(st.st_mode or 0):
                raise DestinationUnavailable(f"destination root {root} on {self.dest.endpoint} "
                                             f"is not a folder")
        except FileNotFoundError:
            if not self.options.get("create_root"):
                raise DestinationUnavailable(f"destination root {root} does not exist on "
                                             f"{self.dest.endpoint}") from None
        self._mkdirs(sftp, self.dest.path)

    def _hash_remote(self, sftp, path: str) -> str:
        digest = hashlib.sha256()
        with sftp.open(path, "rb") as fh:
            fh.prefetch()
            while block := fh.read(CHUNK_SIZE):
                digest.update(block)
        return digest.hexdigest()

    def compare(self, rel: str, size: int, sha256: str, *, deep: bool = True,
                local: Path | None = None) -> str:
        sftp = self._connect()
        path = self._path(rel)
        try:
            st = sftp.stat(path)
        except FileNotFoundError:
            return MISSING
        except OSError as exc:
            raise SyncError(f"cannot stat {self.url(rel)}: {_sftp_message(exc)}") from None
        if not stat.S_ISREG(st.st_mode or 0):
            raise SyncError(f"{self.url(rel)} exists and is not a regular file")
        if st.st_size != size:
            return DIFFERENT
        if not deep:
            return SAME
        return SAME if self._hash_remote(sftp, path) == sha256 else DIFFERENT

    def put(self, local: Path, rel: str, size: int, sha256: str) -> int:
        sftp = self._connect()
        final = PurePosixPath(self._path(rel))
        tmp = str(final.parent / temp_name(final.name))
        self._mkdirs(sftp, str(final.parent))
        try:
            for name in sftp.listdir(str(final.parent)):  # leftovers of a killed copy
                if is_temp_for(name, final.name):
                    sftp.remove(str(final.parent / name))
            digest = hashlib.sha256()
            with open(local, "rb") as src, sftp.open(tmp, "wb") as dst:
                dst.set_pipelined(True)
                sent = _copy_stream(src, dst, digest)
            if sent != size or digest.hexdigest() != sha256:
                raise SyncError(f"{local} changed while it was copied")
            if sftp.stat(tmp).st_size != size:
                raise SyncError(f"verification failed for {self.url(rel)}: size differs")
            if self.options.get("verify", "readback") == "readback" and \
                    self._hash_remote(sftp, tmp) != sha256:
                raise SyncError(f"verification failed for {self.url(rel)}: sha256 differs")
            try:
                sftp.posix_rename(tmp, str(final))
            except OSError:  # servers without posix-rename: not atomic over an old file
                try:
                    sftp.remove(str(final))
                except FileNotFoundError:
                    pass
                sftp.rename(tmp, str(final))
            tmp = None
            return sent
        except SyncError:
            raise
        except OSError as exc:
            raise SyncError(f"cannot write {self.url(rel)}: {_sftp_message(exc)}") from None
        finally:
            if tmp is not None:
                try:
                    sftp.remove(tmp)
                except OSError:
                    pass


def _sftp_message(exc: OSError) -> str:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    text = str(exc)
    if "No space" in text or exc.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    return exc.strerror or text or type(exc).__name__


# ---------------------------------------------------------------------------------------
class S3Backend(Backend):
    """S3 (or any S3-compatible server) with boto3. An object appears only once its upload
    completed; the server checks the SHA-256 we send with it, and the sha256 is also kept
    in the object's metadata so that later runs can compare without downloading."""

    name = "s3"

    def __init__(self, dest: Destination, options: dict[str, Any]):
        super().__init__(dest, options)
        self._s3 = None

    def _client(self):
        if self._s3 is not None:
            return self._s3
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = {}
        key_id = _env_secret(self.options, "access_key_id_env")
        secret = _env_secret(self.options, "secret_access_key_env")
        token = _env_secret(self.options, "session_token_env")
        if key_id or secret:
            kwargs.update(aws_access_key_id=key_id, aws_secret_access_key=secret,
                          aws_session_token=token)
        session = boto3.session.Session(profile_name=self.options.get("profile"), **kwargs)
        endpoint = self.options.get("endpoint_url")
        timeout = float(self.options.get("timeout", 10))
        config = Config(connect_timeout=timeout, read_timeout=timeout * 6,
                        retries={"max_attempts": int(self.options.get("max_attempts", 3)),
                                 "mode": "standard"},
                        s3={"addressing_style": "path" if endpoint else "auto"})
        self._s3 = session.client("s3", endpoint_url=endpoint,
                                  region_name=self.options.get("region"), config=config)
        return self._s3

    def _key(self, rel: str) -> str:
        return f"{self.dest.path}/{rel}" if self.dest.path else rel

    def _fail(self, exc: Exception, what: str) -> SyncError:
        from botocore.exceptions import (ClientError, EndpointConnectionError,
                                         NoCredentialsError, ConnectTimeoutError,
                                         ReadTimeoutError)

        endpoint = self.options.get("endpoint_url") or "AWS S3"
        if isinstance(exc, SyncError):
            return exc
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
            return DestinationUnavailable(f"cannot reach S3 endpoint {endpoint} for {what}: "
                                          f"{type(exc).__name__}")
        if isinstance(exc, NoCredentialsError):
            return DestinationUnavailable(f"no S3 credentials for {what} (set AWS_* or the "
                                          f"*_env options)")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchBucket", "404", "NotFound"):
                return DestinationUnavailable(f"S3 bucket {self.dest.bucket} does not exist "
                                              f"at {endpoint}")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return DestinationUnavailable(f"S3 access denied for {what} ({code})")
            return SyncError(f"S3 error for {what}: {code}")
        return SyncError(f"S3 error for {what}: {type(exc).__name__}")

    def check(self) -> None:
        try:
            self._client().head_bucket(Bucket=self.dest.bucket)
        except Exception as exc:  # noqa: BLE001 - mapped to a clear message
            raise self._fail(exc, self.dest.url()) from None

    def _head(self, rel: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self._client().head_object(Bucket=self.dest.bucket, Key=self._key(rel),
                                              ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(exc, self.url(rel)) from None
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, self.url(rel)) from None

    def compare(self, rel: str, size: int, sha256: str, *, deep: bool = True,
                local: Path | None = None) -> str:
        head = self._head(rel)
        if head is None:
            return MISSING
        if head.get("ContentLength") != size:
            return DIFFERENT
        remote = (head.get("Metadata") or {}).get("sha256")
        if remote:
            return SAME if remote == sha256 else DIFFERENT
        b64 = head.get("ChecksumSHA256")
        if b64 and "-" not in b64:
            return SAME if base64.b64decode(b64).hex() == sha256 else DIFFERENT
        if not deep:
            return SAME
        digest = hashlib.sha256()
        body = self._client().get_object(Bucket=self.dest.bucket, Key=self._key(rel))["Body"]
        for block in iter(lambda: body.read(CHUNK_SIZE), b""):
            digest.update(block)
        return SAME if digest.hexdigest() == sha256 else DIFFERENT

    def put(self, local: Path, rel: str, size: int, sha256: str) -> int:
        s3, key = self._client(), self._key(rel)
        threshold = int(self.options.get("multipart_threshold_mb", 64)) << 20
        try:
            if size < threshold:
                with open(local, "rb") as fh:
                    s3.put_object(Bucket=self.dest.bucket, Key=key, Body=fh,
                                  ContentLength=size, Metadata={"sha256": sha256},
                                  ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode())
            else:
                from boto3.s3.transfer import TransferConfig

                s3.upload_file(str(local), self.dest.bucket, key,
                               ExtraArgs={"Metadata": {"sha256": sha256},
                                          "ChecksumAlgorithm": "SHA256"},
                               Config=TransferConfig(multipart_threshold=threshold))
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, SyncError):
                raise
            raise self._fail(exc, self.url(rel)) from None
        head = self._head(rel)
        if head is None or head.get("ContentLength") != size or \
                (head.get("Metadata") or {}).get("sha256") != sha256:
            raise SyncError(f"verification failed for {self.url(rel)}")
        return size


BACKEND_CLASSES = {"local": LocalBackend, "rsync": RsyncBackend, "sftp": SftpBackend,
                   "s3": S3Backend}


def make_backend(dest: Destination, options: dict[str, Any]) -> Backend:
    return BACKEND_CLASSES[dest.backend](dest, options)
