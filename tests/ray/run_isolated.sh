#!/bin/sh
# Run a command (the Ray tests) in a new network namespace whose only interface is loopback, so nothing it starts
# can reach another address. Without root, unshare or ip the command runs as is and the Ray tests skip themselves.
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then
    exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
exec "$@"
