#!/bin/sh
# How docker-compose.yml (and docker-compose.cluster.yml) start a RabbitMQ node, in the official
# rabbitmq image or the one `make images` builds: the broker's TLS files out of the pki volume,
# owned by the broker's user and readable by no one else, where rabbitmq.conf names them; on a
# cluster, the Erlang cookie every node shares (WEBOS_ERLANG_COOKIE, from .env); then the image's
# own entrypoint.
set -e
install -d -o rabbitmq -g rabbitmq -m 700 /etc/rabbitmq/tls
install -o rabbitmq -g rabbitmq -m 600 /pki/ca.crt /pki/server.crt /pki/server.key /etc/rabbitmq/tls/
if [ -n "$WEBOS_ERLANG_COOKIE" ]; then
    cookie=/var/lib/rabbitmq/.erlang.cookie
    rm -f "$cookie"
    (umask 377 && printf '%s' "$WEBOS_ERLANG_COOKIE" > "$cookie")
    chown rabbitmq:rabbitmq "$cookie"
    unset WEBOS_ERLANG_COOKIE
fi
exec docker-entrypoint.sh rabbitmq-server
