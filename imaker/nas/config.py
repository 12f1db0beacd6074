"""NAS sync configuration: the ``nasSync`` YAML of the plan, loaded and validated.

.. code-block:: yaml

    nasSync:
      enabled: true
      collision: overwrite            # default policy: overwrite | keep-both | skip
      remoteRoots:
        audio: "/mnt/nas/Instrumentals"
        video: "sftp://media@nas.local/volume1/Videos"
        stems: "s3://my-bucket/stems"
      routes:
        - match: { kind: "audio", variant: "instrumental" }
          to: "${remoteRoots.audio}/Instrumental"
        - match: { kind: "video" }
          to: "${remoteRoots.video}"
          name: "{artist}/{filename}"   # optional file name template
          collision: keep-both          # optional per-route policy
          backend: sftp                 # optional; normally chosen by the destination

Every error names the file and the key (``nasSync.routes[1].to``). Secrets never live in
the YAML: options ending in ``_env`` name environment variables that hold them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

POLICIES = ("overwrite", "keep-both", "skip")
BACKENDS = ("local", "rsync", "sftp", "s3")
MATCH_KEYS = ("kind", "variant")
NAME_FIELDS = ("filename", "stem", "ext", "job_id", "artist", "album", "title", "kind",
               "variant")
_INTERP = re.compile(r"\$\{([^}]*)\}")
_ROOT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

#: options accepted per backend (in ``nasSync.backends.<name>`` or a route's ``options``)
BACKEND_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "local": {"create_root": bool},
    "rsync": {"create_root": bool, "port": int, "user": str, "ssh_key_file": str,
              "known_hosts": str, "password_env": str, "timeout": int, "bwlimit": int,
              "extra_args": list},
    "sftp": {"create_root": bool, "port": int, "user": str, "key_file": str,
             "key_file_env": str, "password_env": str, "known_hosts": str,
             "strict_host_key_checking": bool, "timeout": (int, float), "verify": str},
    "s3": {"endpoint_url": str, "region": str, "access_key_id_env": str,
           "secret_access_key_env": str, "session_token_env": str, "profile": str,
           "timeout": (int, float), "max_attempts": int, "multipart_threshold_mb": int},
}
#: keys that would put a secret into the file; refused with a hint
_SECRET_KEYS = {"password", "secret", "secret_access_key", "access_key_id", "session_token",
                "token", "passphrase"}


class NasConfigError(ValueError):
    """The NAS sync configuration is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Destination:
    """Where a route sends files, parsed from its ``to``.

    ``backend`` is local | rsync | sftp | s3. ``path`` is the folder (for s3 the key
    prefix, without a leading slash). ``root`` is the part of the destination that must
    already exist (the interpolated remote root), so that an unmounted NAS share is never
    silently replaced by a local folder.
    """

    backend: str
    path: str
    host: str | None = None
    port: int | None = None
    user: str | None = None
    module: str | None = None  # rsync daemon module
    bucket: str | None = None
    style: str = ""  # rsync: "daemon" | "ssh" | "local"
    root: str | None = None

    def url(self, rel: str = "") -> str:
        """A printable address (never holds a secret)."""
        path = _join(self.path, rel)
        if self.backend == "local":
            return path
        if self.backend == "s3":
            return f"s3://{self.bucket}/{path}"
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        if self.backend == "sftp":
            return f"sftp://{who}{self.host}{port}{path if path.startswith('/') else '/' + path}"
        if self.style == "daemon":
            return f"rsync://{who}{self.host}{port}/{self.module}/{path.lstrip('/')}".rstrip("/")
        if self.style == "ssh":
            return f"{who}{self.host}:{path}"
        return path

    @property
    def endpoint(self) -> str:
        """What a connection is opened to (for grouping and messages)."""
        if self.backend == "s3":
            return f"s3://{self.bucket}"
        if self.host:
            return f"{self.backend}://{self.user + '@' if self.user else ''}{self.host}" \
                   f"{':' + str(self.port) if self.port else ''}"
        return self.backend


def _join(base: str, rel: str) -> str:
    if not rel:
        return base
    if not base:
        return rel
    return base.rstrip("/") + "/" + rel.lstrip("/")


@dataclass(frozen=True)
class Route:
    index: int
    kind: str | None
    variant: str | None
    to: str  # after interpolation
    destination: Destination
    collision: str
    name: str = "{filename}"
    options: dict[str, Any] = field(default_factory=dict)

    def matches(self, kind: str, variant: str) -> bool:
        return (self.kind is None or self.kind == kind) and \
               (self.variant is None or self.variant == variant)

    def describe(self) -> str:
        crit = ", ".join(f"{k}={v}" for k, v in (("kind", self.kind), ("variant", self.variant))
                         if v is not None) or "any"
        return f"routes[{self.index}] ({crit})"


@dataclass(frozen=True)
class NasConfig:
    enabled: bool
    routes: tuple[Route, ...]
    remote_roots: dict[str, str]
    collision: str = "overwrite"
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<dict>"

    def route_for(self, kind: str, variant: str) -> Route | None:
        """First route whose ``match`` fits wins; None when none does."""
        for route in self.routes:
            if route.matches(kind, variant):
                return route
        return None

    def options_for(self, route: Route) -> dict[str, Any]:
        merged = dict(self.backends.get(route.destination.backend, {}))
        merged.update(route.options)
        return merged

    @property
    def fingerprint(self) -> str:
        """Changes when anything that decides where files go changes."""
        data = {"routes": [[r.kind, r.variant, r.destination.url(), r.name, r.collision,
                            sorted(r.options.items(), key=str)] for r in self.routes]}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
def load_config(path: Path | str) -> NasConfig:
    """Read and validate a YAML file (``yaml.safe_load``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NasConfigError(f"{path}: NAS sync config file does not exist") from None
    except OSError as exc:
        raise NasConfigError(f"{path}: cannot read NAS sync config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise NasConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_config(data, source=str(path))


def parse_config(data: Any, *, source: str = "<dict>") -> NasConfig:
    def err(key: str, msg: str) -> NasConfigError:
        return NasConfigError(f"{source}: {key}: {msg}")

    if not isinstance(data, dict) or "nasSync" not in data:
        raise NasConfigError(f"{source}: top level must be a mapping with a 'nasSync' key")
    top = data["nasSync"]
    if top is None:
        top = {}
    if not isinstance(top, dict):
        raise err("nasSync", "must be a mapping")
    known = {"enabled", "remoteRoots", "routes", "collision", "backends"}
    unknown = sorted(set(top) - known)
    if unknown:
        raise err(f"nasSync.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")

    enabled = top.get("enabled", True)
    if not isinstance(enabled, bool):
        raise err("nasSync.enabled", f"must be true or false, got {enabled!r}")
    collision = _policy(top.get("collision", "overwrite"), "nasSync.collision", err)

    roots_raw = top.get("remoteRoots") or {}
    if not isinstance(roots_raw, dict):
        raise err("nasSync.remoteRoots", "must be a mapping of name: destination")
    roots: dict[str, str] = {}
    for name, value in roots_raw.items():
        key = f"nasSync.remoteRoots.{name}"
        if not isinstance(name, str) or not _ROOT_NAME.match(name):
            raise err(key, "root names are letters, digits, '_', '.', '-'")
        if not isinstance(value, str) or not value.strip():
            raise err(key, "must be a non-empty string")
        if _INTERP.search(value):
            raise err(key, "a remote root cannot refer to another root")
        roots[name] = value.strip()

    backends_raw = top.get("backends") or {}
    if not isinstance(backends_raw, dict):
        raise err("nasSync.backends", "must be a mapping of backend name: options")
    backends: dict[str, dict[str, Any]] = {}
    for name, opts in backends_raw.items():
        if name not in BACKENDS:
            raise err(f"nasSync.backends.{name}", f"unknown backend (use one of {', '.join(BACKENDS)})")
        backends[name] = _options(opts, name, f"nasSync.backends.{name}", err)

    routes_raw = top.get("routes")
    if routes_raw is None:
        routes_raw = []
    if not isinstance(routes_raw, list):
        raise err("nasSync.routes", "must be a list of routes")
    if enabled and not routes_raw:
        raise err("nasSync.routes", "sync is enabled but no route is configured")
    routes = []
    for i, raw in enumerate(routes_raw):
        key = f"nasSync.routes[{i}]"
        if not isinstance(raw, dict):
            raise err(key, "must be a mapping with 'match' and 'to'")
        bad = sorted(set(raw) - {"match", "to", "backend", "collision", "name", "options"})
        if bad:
            raise err(f"{key}.{bad[0]}", "unknown key (known: match, to, backend, collision, "
                                         "name, options)")
        match = raw.get("match") or {}
        if not isinstance(match, dict):
            raise err(f"{key}.match", "must be a mapping like {kind: audio, variant: instrumental}")
        bad = sorted(set(match) - set(MATCH_KEYS))
        if bad:
            raise err(f"{key}.match.{bad[0]}", "unknown match key (use kind and/or variant)")
        for mk in MATCH_KEYS:
            if mk in match and match[mk] is not None and not isinstance(match[mk], str):
                raise err(f"{key}.match.{mk}", "must be a string")
        to = raw.get("to")
        if to is None or (isinstance(to, str) and not to.strip()):
            raise err(f"{key}.to", "route has no 'to' destination")
        if not isinstance(to, str):
            raise err(f"{key}.to", "must be a string")
        resolved, root_name = _interpolate(to.strip(), roots, f"{key}.to", err)
        backend = raw.get("backend")
        if backend is not None and backend not in BACKENDS:
            raise err(f"{key}.backend", f"bad backend {backend!r} (use one of {', '.join(BACKENDS)})")
        dest = parse_destination(resolved, backend=backend,
                                 root=roots[root_name] if root_name else None,
                                 key=f"{key}.to", err=err)
        name_tpl = raw.get("name", "{filename}")
        _check_name_template(name_tpl, f"{key}.name", err)
        routes.append(Route(
            index=i, kind=match.get("kind"), variant=match.get("variant"), to=resolved,
            destination=dest, collision=_policy(raw.get("collision", collision), f"{key}.collision", err),
            name=name_tpl,
            options=_options(raw.get("options") or {}, dest.backend, f"{key}.options", err)))
    return NasConfig(enabled=enabled, routes=tuple(routes), remote_roots=roots,
                     collision=collision, backends=backends, source=source)


def _policy(value: Any, key: str, err) -> str:
    if value not in POLICIES:
        raise err(key, f"bad collision policy {value!r} (use one of {', '.join(POLICIES)})")
    return value


def _options(opts: Any, backend: str, key: str, err) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise err(key, "must be a mapping")
    allowed = BACKEND_OPTIONS[backend]
    out = {}
    for name, value in opts.items():
        if name in _SECRET_KEYS:
            raise err(f"{key}.{name}", f"secrets do not go in the config file; put it in an "
                                       f"environment variable and set {name}_env to its name")
        if name not in allowed:
            raise err(f"{key}.{name}", f"unknown option for the {backend} backend "
                                       f"(known: {', '.join(sorted(allowed))})")
        if not isinstance(value, allowed[name]) or (allowed[name] is int and isinstance(value, bool)):
            raise err(f"{key}.{name}", f"wrong type {type(value).__name__}")
        if name == "verify" and value not in ("readback", "size"):
            raise err(f"{key}.{name}", "must be readback or size")
        if name == "extra_args" and not all(isinstance(a, str) for a in value):
            raise err(f"{key}.{name}", "must be a list of strings")
        out[name] = value
    return out


def _interpolate(text: str, roots: dict[str, str], key: str, err) -> tuple[str, str | None]:
    used: list[str] = []

    def sub(m: re.Match) -> str:
        ref = m.group(1).strip()
        if not ref.startswith("remoteRoots."):
            raise err(key, f"unknown reference ${{{ref}}} (only ${{remoteRoots.<name>}} is supported)")
        name = ref[len("remoteRoots."):]
        if name not in roots:
            known = ", ".join(sorted(roots)) or "none defined"
            raise err(key, f"unknown remote root {name!r} in ${{{ref}}} (roots: {known})")
        used.append(name)
        return roots[name]

    out = _INTERP.sub(sub, text)
    if "${" in out:
        raise err(key, "unterminated ${...} reference")
    if used and not text.startswith("${"):
        raise err(key, "a ${remoteRoots.<name>} reference must start the destination")
    return out, (used[0] if used else None)


def _check_name_template(tpl: Any, key: str, err) -> None:
    if not isinstance(tpl, str) or not tpl.strip():
        raise err(key, "must be a non-empty string like '{artist}/{filename}'")
    for fld in re.findall(r"\{([^}]*)\}", tpl):
        if fld not in NAME_FIELDS:
            raise err(key, f"unknown field {{{fld}}} (known: {', '.join(NAME_FIELDS)})")
    if tpl.startswith("/") or ".." in tpl.split("/"):
        raise err(key, "must be a relative path without '..'")


_HOSTPATH = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<path>.*)$")


def parse_destination(to: str, *, backend: str | None = None, root: str | None = None,
                      key: str = "to", err=None) -> Destination:
    """``/path`` or ``file:///path`` -> local; ``rsync://host/module/path`` or
    ``[user@]host:path`` -> rsync; ``sftp://`` / ``scp://`` -> sftp; ``s3://bucket/prefix`` -> s3.
    ``backend`` forces a backend (``rsync`` for a local path syncs it with the rsync binary)."""
    if err is None:
        def err(k, msg):
            return NasConfigError(f"{k}: {msg}")
    root_path = None
    if root is not None:
        root_path = _parse(root, backend, key, err).path
    dest = _parse(to, backend, key, err)
    return Destination(**{**dest.__dict__, "root": root_path})


def _parse(to: str, backend: str | None, key: str, err) -> Destination:
    scheme = ""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", to)
    if m:
        scheme = m.group(1).lower()
    if scheme in ("sftp", "scp", "rsync", "s3", "file"):
        parts = urlsplit(to)
        if parts.password:
            raise err(key, "passwords do not go in destinations; use password_env")
        try:
            port = parts.port
        except ValueError:
            raise err(key, f"bad port in {to!r}") from None
        user = unquote(parts.username) if parts.username else None
        path = unquote(parts.path)
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise err(key, "file:// URLs must be local (file:///path)")
            kind = backend or "local"
            return _local(path, kind, key, err)
        if not parts.hostname:
            raise err(key, f"{scheme}:// destination has no host")
        if scheme == "s3":
            if backend not in (None, "s3"):
                raise err(key, f"backend {backend} cannot write to an s3:// destination")
            return Destination("s3", path.strip("/"), bucket=parts.hostname)
        if scheme in ("sftp", "scp"):
            if backend not in (None, "sftp"):
                raise err(key, f"backend {backend} cannot write to an {scheme}:// destination")
            if not path.startswith("/"):
                path = "/" + path
            return Destination("sftp", path, host=parts.hostname, port=port, user=user)
        # rsync daemon: rsync://[user@]host[:port]/module/path
        if backend not in (None, "rsync"):
            raise err(key, f"backend {backend} cannot write to an rsync:// destination")
        pieces = path.strip("/").split("/", 1)
        if not pieces[0]:
            raise err(key, "rsync:// destination needs a module: rsync://host/module/path")
        return Destination("rsync", "/" + (pieces[1] if len(pieces) > 1 else ""),
                           host=parts.hostname, port=port, user=user, module=pieces[0],
                           style="daemon")
    if scheme:
        raise err(key, f"unsupported destination scheme {scheme}:// (use a path, file://, "
                       "rsync://, host:path, sftp://, scp:// or s3://)")
    if to.startswith("/"):
        return _local(to, backend or "local", key, err)
    hp = _HOSTPATH.match(to)
    if hp:
        if backend not in (None, "rsync", "sftp"):
            raise err(key, f"backend {backend} cannot write to a host:path destination")
        path = hp.group("path") or "."
        return Destination(backend or "rsync", path, host=hp.group("host").strip("[]"),
                           user=hp.group("user"), style="ssh")
    raise err(key, f"destination {to!r} must be an absolute path, file://, rsync://, "
                   "host:path, sftp://, scp:// or s3:// (after interpolation)")


def _local(path: str, kind: str, key: str, err) -> Destination:
    if not path.startswith("/"):
        raise err(key, f"local destination {path!r} must be an absolute path")
    if kind not in ("local", "rsync"):
        raise err(key, f"backend {kind} cannot write to a local path")
    return Destination(kind, path.rstrip("/") or "/", style="local" if kind == "rsync" else "")
