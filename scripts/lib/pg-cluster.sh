# Sourced by the benchmark scripts: a throwaway PostgreSQL cluster in a
# temporary folder on a free port, removed on exit. Defines $port, url NAME,
# psql_ ARGS, and a cleanup on EXIT (extend it with pg_cluster_cleanup).
# Tuned for bulk writes (512 MB of shared buffers, checkpoints far apart)
# unless PG_CLUSTER_SETTINGS=defaults: then PostgreSQL's own settings.
bindir="$(pg_config --bindir)"
tmp="$(mktemp -d /tmp/normalizer-bench.XXXXXX)"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then chown postgres "$tmp"; as_pg=(runuser -u postgres --); fi
# The server's tools run from its own folder: the postgres user may not be
# able to enter the checkout.
pg() { (cd "$tmp" && "${as_pg[@]}" "$@"); }
port="$("$(dirname "${BASH_SOURCE[0]}")/free-ports")"
pg_cluster_cleanup() { pg "$bindir/pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap pg_cluster_cleanup EXIT
pg "$bindir/initdb" -D "$tmp/data" -U postgres --auth=trust -E UTF8 >/dev/null
cat >> "$tmp/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$tmp'
CONF
if [ "${PG_CLUSTER_SETTINGS:-tuned}" != defaults ]; then
  cat >> "$tmp/data/postgresql.conf" <<CONF
shared_buffers = 512MB
max_wal_size = 4GB
checkpoint_timeout = 30min
CONF
fi
pg "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w start >/dev/null
url() { echo "postgres://postgres@127.0.0.1:$port/$1"; }
psql_() { "$bindir/psql" -q -h 127.0.0.1 -p "$port" -U postgres "$@"; }
