#!/bin/sh
# The web container's entrypoint for the nginx drain hook under compose (see the README):
# runs nginx (the arguments, in the foreground) and reloads it gracefully when the sidecar asks,
# through a file on a volume both containers mount: the sidecar, unprivileged in its own
# container, cannot signal nginx's master (root) itself. A graceful reload starts new workers;
# the old ones finish the requests in flight, close their keep-alive connections and exit.
#   sidecar: SIDECAR_DRAIN_COMMAND="sh -c 'touch /run/drain/reload && while [ -e /run/drain/reload ]; do sleep 0.2; done'"
# (the request is removed once nginx has been sent its SIGHUP: the hook then succeeds)
set -eu
dir=${DRAIN_DIR:-/run/drain}
mkdir -p "$dir"
chmod 1777 "$dir" # the sidecar runs as uid 10001
rm -f "$dir/reload"
"$@" &
app=$!
# docker stop (SIGTERM) or nginx's own stop signal (SIGQUIT): a graceful shutdown of nginx
trap 'kill -QUIT "$app" 2>/dev/null || true' TERM INT QUIT
while kill -0 "$app" 2>/dev/null; do
    if [ -e "$dir/reload" ]; then
        kill -HUP "$app"
        rm -f "$dir/reload"
        echo "nginx-reload-on-drain: drain requested, nginx reloaded gracefully" >&2
    fi
    sleep 1 &
    wait $! || true
done
wait "$app"
