"""The nasSync YAML: loading, validation messages, interpolation, routing, destinations."""

import textwrap

import pytest

from imaker.nas import NasConfigError, load_config, parse_destination, resolve_config

EXAMPLE = """\
nasSync:
  enabled: true
  collision: overwrite
  remoteRoots:
    audio: "/mnt/nas/Instrumentals"
    video: "sftp://media@nas.local:2222/volume1/Videos"
    stems: "s3://media-bucket/stems"
  backends:
    sftp: {key_file: /keys/id_ed25519, known_hosts: /keys/known_hosts}
    s3: {endpoint_url: "http://127.0.0.1:9000", secret_access_key_env: NAS_S3_SECRET}
  routes:
    - match: { kind: "audio", variant: "instrumental" }
      to: "${remoteRoots.audio}/Instrumental"
    - match: { kind: "audio", variant: "no_drums" }
      to: "${remoteRoots.audio}/NoDrums"
      collision: keep-both
    - match: { kind: "video" }
      to: "${remoteRoots.video}"
      name: "{artist}/{filename}"
    - match: { kind: "stems" }
      to: "${remoteRoots.stems}"
      name: "{job_id}/{filename}"
    - match: { variant: "drums_only" }
      to: "nas.local:/share/drums"
"""


def write(tmp_path, text):
    path = tmp_path / "nas.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_full_example_routes_first_match_with_interpolation(tmp_path):
    config = load_config(write(tmp_path, EXAMPLE))
    assert config.enabled and config.collision == "overwrite"
    inst = config.route_for("audio", "instrumental")
    assert inst.to == "/mnt/nas/Instrumentals/Instrumental"
    assert inst.destination.backend == "local" and inst.destination.root == "/mnt/nas/Instrumentals"
    nod = config.route_for("audio", "no_drums")
    assert nod.to == "/mnt/nas/Instrumentals/NoDrums" and nod.collision == "keep-both"
    video = config.route_for("video", "instrumental")
    d = video.destination
    assert (d.backend, d.host, d.port, d.user, d.path) == ("sftp", "nas.local", 2222, "media",
                                                          "/volume1/Videos")
    assert video.name == "{artist}/{filename}"
    assert config.options_for(video) == {"key_file": "/keys/id_ed25519",
                                         "known_hosts": "/keys/known_hosts"}
    # variant omitted = any variant; kind omitted = any kind; order decides
    assert config.route_for("video", "no_drums") is video
    assert config.route_for("audio", "drums_only").destination.backend == "rsync"
    assert config.route_for("audio", "karaoke") is None
    stems = config.route_for("stems", "vocals").destination
    assert (stems.backend, stems.bucket, stems.path) == ("s3", "media-bucket", "stems")


def test_first_matching_route_wins(tmp_path):
    config = load_config(write(tmp_path, """\
        nasSync:
          remoteRoots: {a: /a}
          routes:
            - match: {kind: audio}
              to: "${remoteRoots.a}/all"
            - match: {kind: audio, variant: instrumental}
              to: "${remoteRoots.a}/never"
        """))
    assert config.route_for("audio", "instrumental").to == "/a/all"


@pytest.mark.parametrize("body,key,needle", [
    ("""remoteRoots: {audio: /a}
  routes:
    - match: {kind: audio}
      to: "${remoteRoots.music}/x"
""", "nasSync.routes[0].to", "unknown remote root 'music'"),
    ("""routes:
    - match: {kind: audio}
""", "nasSync.routes[0].to", "no 'to'"),
    ("""routes:
    - match: {kind: audio}
      to: /x
      backend: ftp
""", "nasSync.routes[0].backend", "bad backend 'ftp'"),
    ("""routes:
    - to: /x
      collision: rename
""", "nasSync.routes[0].collision", "bad collision policy"),
    ("""routes:
    - match: {kind: audio, codec: aac}
      to: /x
""", "nasSync.routes[0].match.codec", "unknown match key"),
    ("""routes:
    - to: "ftp://host/x"
""", "nasSync.routes[0].to", "unsupported destination scheme"),
    ("""routes:
    - to: "relative/path"
""", "nasSync.routes[0].to", "must be an absolute path"),
    ("""routes:
    - to: "sftp://me:hunter2@host/x"
""", "nasSync.routes[0].to", "passwords do not go in destinations"),
    ("""backends:
    sftp: {password: hunter2}
  routes:
    - to: /x
""", "nasSync.backends.sftp.password", "set password_env"),
    ("""backends:
    s3: {bogus: 1}
  routes:
    - to: /x
""", "nasSync.backends.s3.bogus", "unknown option"),
    ("""routes:
    - to: /x
      name: "{artist}/{genre}"
""", "nasSync.routes[0].name", "unknown field {genre}"),
    ("""routes: []
""", "nasSync.routes", "no route is configured"),
    ("""enabled: maybe
  routes: [{to: /x}]
""", "nasSync.enabled", "true or false"),
    ("""routez: []
""", "nasSync.routez", "unknown key"),
])
def test_errors_name_the_file_and_the_key(tmp_path, body, key, needle):
    path = write(tmp_path, "nasSync:\n  " + body)
    with pytest.raises(NasConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}:"), msg
    assert needle in msg, msg
    assert "hunter2" not in msg


def test_yaml_syntax_and_shape_errors(tmp_path):
    path = write(tmp_path, "nasSync:\n  routes: [\n")
    with pytest.raises(NasConfigError, match=rf"{path}: not valid YAML at line \d+"):
        load_config(path)
    path = write(tmp_path, "- just a list\n")
    with pytest.raises(NasConfigError, match="'nasSync' key"):
        load_config(path)
    # safe_load: no Python object construction
    path = write(tmp_path, "nasSync: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(NasConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(NasConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("to,expected", [
    ("/mnt/nas/x", ("local", "/mnt/nas/x", None, None)),
    ("file:///mnt/nas/x", ("local", "/mnt/nas/x", None, None)),
    ("rsync://nas:8873/share/music", ("rsync", "/music", "nas", 8873)),
    ("backup@nas.local:/srv/music", ("rsync", "/srv/music", "nas.local", None)),
    ("sftp://nas/srv/music", ("sftp", "/srv/music", "nas", None)),
    ("scp://u@nas:22/srv/music", ("sftp", "/srv/music", "nas", 22)),
    ("s3://bucket/pre/fix", ("s3", "pre/fix", None, None)),
])
def test_destinations_pick_their_backend(to, expected):
    d = parse_destination(to)
    assert (d.backend, d.path, d.host, d.port) == expected
    assert "password" not in d.url()


def test_backend_override_and_module():
    d = parse_destination("/mnt/nas/x", backend="rsync")
    assert d.backend == "rsync" and d.style == "local"
    d = parse_destination("rsync://nas/share/a/b")
    assert d.module == "share" and d.url("f.m4a") == "rsync://nas/share/a/b/f.m4a"
    with pytest.raises(NasConfigError, match="backend s3 cannot write to a local path"):
        parse_destination("/x", backend="s3")


def test_resolve_config_skips_when_disabled_or_not_configured(tmp_path):
    assert resolve_config(False, tmp_path / "x.yaml") == (
        None, "NAS sync is disabled (NAS_SYNC_ENABLED is false)")
    config, reason = resolve_config(True, tmp_path / "x.yaml")
    assert config is None and "no config file at" in reason
    path = write(tmp_path, "nasSync:\n  enabled: false\n")
    config, reason = resolve_config(True, path)
    assert config is None and "nasSync.enabled: false" in reason
    path = write(tmp_path, "nasSync:\n  routes: [{to: /x}]\n")
    config, _ = resolve_config(True, path)
    assert config is not None and config.route_for("audio", "x").to == "/x"
    # an invalid file is an error, not a silent skip
    path = write(tmp_path, "nasSync:\n  routes: [{match: {kind: audio}}]\n")
    with pytest.raises(NasConfigError, match="routes\\[0\\].to"):
        resolve_config(True, path)


def test_fingerprint_follows_routes(tmp_path):
    a = load_config(write(tmp_path, "nasSync:\n  routes: [{to: /x}]\n"))
    b = load_config(write(tmp_path, "nasSync:\n  routes: [{to: /y}]\n"))
    c = load_config(write(tmp_path, "nasSync:\n  routes: [{to: /x}]\n"))
    assert a.fingerprint != b.fingerprint and a.fingerprint == c.fingerprint
