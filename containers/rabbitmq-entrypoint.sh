#!/bin/sh
# What this project uses of the official rabbitmq image's entrypoint: the first user from
# RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS, and the broker run as the rabbitmq user.
set -e
if [ -n "$RABBITMQ_DEFAULT_USER" ]; then
    install -d -m 755 /etc/rabbitmq/conf.d
    umask 077
    printf 'default_user = %s\ndefault_pass = %s\n' \
        "$RABBITMQ_DEFAULT_USER" "$RABBITMQ_DEFAULT_PASS" > /etc/rabbitmq/conf.d/10-defaults.conf
    chown rabbitmq:rabbitmq /etc/rabbitmq/conf.d/10-defaults.conf
fi
if [ "$1" = rabbitmq-server ] && [ "$(id -u)" = 0 ]; then
    chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
    export HOME=/var/lib/rabbitmq  # its Erlang cookie lives there
    shift
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
        /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
