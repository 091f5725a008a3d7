#!/bin/sh
# Container entrypoint: give prometheus_client a clean multiprocess directory, then exec.
# Stale *.db files from a previous start would be summed into the new process's metrics
# (an emptyDir survives container restarts in Kubernetes), so wipe them before anything
# imports prometheus_client. exec keeps the command as tini's direct child so SIGTERM
# reaches Celery/gunicorn for a graceful shutdown.
set -eu
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -maxdepth 1 -name '*.db' -delete
fi
exec "$@"
