# Stand-in for python:3.11-slim-bookworm on hosts that reach no image registry (CI):
# Debian's python3.11 on a debootstrap'ed bookworm (docker/base/build-standins.sh).
ARG DEBIAN_IMAGE=imaker-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3
CMD ["python3"]
