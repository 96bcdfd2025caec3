#!/bin/sh
# A bare sandbox host: sshd in the foreground, the testbed's key for the `deploy` user, nothing else running.
# The Docker engine's sandbox settings (inner bridge and address pools, storage driver) are written where a
# non-systemd Debian host keeps dockerd's options, /etc/default/docker, for `ingestctl setup` to use once it
# has installed Docker. Real servers have systemd and need none of this.
set -eu

mkdir -p /home/deploy/.ssh /run/sshd /run/sandbox /var/log
chmod 0700 /home/deploy/.ssh
if [ -n "${SSH_AUTHORIZED_KEY:-}" ]; then
    printf '%s\n' "$SSH_AUTHORIZED_KEY" > /home/deploy/.ssh/authorized_keys
    chmod 0600 /home/deploy/.ssh/authorized_keys
fi
chown -R deploy:deploy /home/deploy/.ssh
unset SSH_AUTHORIZED_KEY
ssh-keygen -A >/dev/null

# OpenSSH before 9.8 (bookworm) refuses unknown options: drop the ones it does not know.
if ! /usr/sbin/sshd -t >/dev/null 2>&1; then
    sed -i '/^PerSourcePenalties/d' /etc/ssh/sshd_config.d/10-sandbox.conf
fi

if [ ! -e /etc/default/docker ]; then
    opts="--bip=${INNER_BRIDGE_IP:-10.250.0.1/24} --default-address-pool=${INNER_ADDRESS_POOL:-base=10.251.0.0/16,size=24}"
    case "${INNER_STORAGE_DRIVER:-auto}" in
        auto) ;;
        *) opts="$opts --storage-driver=$INNER_STORAGE_DRIVER" ;;
    esac
    mkdir -p /etc/default
    printf '# Written by the sandbox entrypoint: options for dockerd on this host without systemd.\nDOCKER_OPTS="%s"\n' \
        "$opts" > /etc/default/docker
fi
unset INNER_BRIDGE_IP INNER_ADDRESS_POOL INNER_STORAGE_DRIVER

exec /usr/sbin/sshd -D -e
