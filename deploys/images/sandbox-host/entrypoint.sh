#!/bin/sh
# Start the inner Docker engine in the background, then run sshd in the foreground as the main process.
# INNER_STORAGE_DRIVER: auto (overlay2, falling back to vfs), overlay2 or vfs. The driver in use is
# written to /run/sandbox/storage-driver so `ingestctl testbed` can record it.
set -eu

mkdir -p /root/.ssh /run/sshd /run/sandbox /var/log
chmod 0700 /root/.ssh
if [ -n "${SSH_AUTHORIZED_KEY:-}" ]; then
    printf '%s\n' "$SSH_AUTHORIZED_KEY" > /root/.ssh/authorized_keys
    chmod 0600 /root/.ssh/authorized_keys
fi
ssh-keygen -A >/dev/null

# The key is in authorized_keys; SSH sessions must not inherit it or the entrypoint's other settings.
unset SSH_AUTHORIZED_KEY

engine_answers() {
    timeout 5 docker info >/dev/null 2>&1
}

start_engine() {
    driver="$1"
    dockerd --storage-driver="$driver" \
        --bip="${INNER_BRIDGE_IP:-10.250.0.1/24}" \
        --default-address-pool="${INNER_ADDRESS_POOL:-base=10.251.0.0/16,size=24}" \
        >>/var/log/dockerd.log 2>&1 &
    engine_pid=$!
    tries=0
    while [ "$tries" -lt 60 ]; do
        if engine_answers; then
            echo "$driver" > /run/sandbox/storage-driver
            return 0
        fi
        if ! kill -0 "$engine_pid" 2>/dev/null; then
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.5
    done
    kill "$engine_pid" 2>/dev/null || true
    wait "$engine_pid" 2>/dev/null || true
    return 1
}

choose_and_start_engine() {
    case "${INNER_STORAGE_DRIVER:-auto}" in
        auto)
            if start_engine overlay2; then return 0; fi
            echo "overlay2 did not start; falling back to vfs" >>/var/log/dockerd.log
            rm -rf /var/lib/docker/overlay2 /var/lib/docker/image/overlay2
            start_engine vfs ;;
        *)
            start_engine "$INNER_STORAGE_DRIVER" ;;
    esac || echo failed > /run/sandbox/storage-driver
}

# The engine starts in the background so sshd answers at once; `testbed up` waits for both.
choose_and_start_engine &

exec /usr/sbin/sshd -D -e
