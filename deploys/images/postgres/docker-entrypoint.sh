#!/bin/bash
# The official image's contract, trimmed to what this project uses:
#   POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE (required), POSTGRES_USER (default postgres),
#   POSTGRES_DB (default $POSTGRES_USER), PGDATA; initdb on first start; scram auth on all interfaces.
set -euo pipefail

file_env() {
    # NAME or NAME_FILE, never both (as in the official image).
    local var="$1" file_var="${1}_FILE" default="${2:-}"
    if [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ]; then
        echo "error: both $var and $file_var are set; set only one" >&2
        exit 1
    fi
    local value="$default"
    if [ -n "${!var:-}" ]; then
        value="${!var}"
    elif [ -n "${!file_var:-}" ]; then
        value="$(< "${!file_var}")"
    fi
    export "$var"="$value"
    unset "$file_var"
}

if [ "${1:-}" = "postgres" ] && [ "$(id -u)" = "0" ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec gosu postgres "$BASH_SOURCE" "$@"
fi

if [ "${1:-}" = "postgres" ]; then
    file_env POSTGRES_PASSWORD
    file_env POSTGRES_USER postgres
    file_env POSTGRES_DB "$POSTGRES_USER"

    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        if [ -z "$POSTGRES_PASSWORD" ]; then
            echo "error: database is uninitialized and POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) is not set" >&2
            exit 1
        fi
        pwfile="$(mktemp)"
        printf '%s' "$POSTGRES_PASSWORD" > "$pwfile"
        initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
            --encoding=UTF8 --locale=C.UTF-8 >/dev/null
        rm -f "$pwfile"
        {
            echo "listen_addresses = '*'"
            echo "password_encryption = 'scram-sha-256'"
        } >> "$PGDATA/postgresql.conf"
        echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"

        # Create the database over the local socket only, before the server listens on the network.
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        if [ "$POSTGRES_DB" != "postgres" ]; then
            psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
                -c "CREATE DATABASE \"$POSTGRES_DB\"" >/dev/null
        fi
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
        echo "PostgreSQL init process complete; ready for start up."
    fi
    unset POSTGRES_PASSWORD
fi

exec "$@"
