#!/bin/sh
# postgres:15's entrypoint contract, minimal: initdb on first start with POSTGRES_USER /
# POSTGRES_PASSWORD / POSTGRES_DB, then `postgres` listening on all addresses.
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
if [ "${1:-postgres}" = "postgres" ]; then
    [ $# -gt 0 ] && shift
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        pwfile=$(mktemp)
        printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
        initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" -E UTF8 \
            --auth-local=trust --auth-host=scram-sha-256 >/dev/null
        rm -f "$pwfile"
        echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
        echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
        if [ "$POSTGRES_DB" != "postgres" ]; then
            pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
            psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres \
                -c "CREATE DATABASE \"$POSTGRES_DB\"" >/dev/null
            pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
        fi
        echo "postgres stand-in: initialised $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
    fi
    exec postgres -D "$PGDATA" "$@"
fi
exec "$@"
