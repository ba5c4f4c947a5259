#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries (initdb, pg_ctl) are installed: the test suite starts its own throwaway
# server on 127.0.0.1 from them (tests/services.py). Installs Debian's `postgresql` when they are missing and we
# are root; otherwise says what to install. Quiet unless something fails.
set -euo pipefail
pg_lib=${PG_LIB_DIR:-/usr/lib/postgresql}     # where Debian puts the versioned server binaries
have_pg() {
  command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1 && return 0
  compgen -G "$pg_lib/*/bin/pg_ctl" >/dev/null
}
have_pg && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: PostgreSQL server binaries not found; install them (Debian/Ubuntu: sudo apt-get install -y postgresql)" >&2
  exit 1
fi
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
# the package's post-install starts a default cluster on 5432 where it can; the tests do not use it, so stop it
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
if command -v pg_ctlcluster >/dev/null 2>&1; then
  for conf in /etc/postgresql/*/main; do
    [[ -d $conf ]] || continue
    v=$(basename "$(dirname "$conf")")
    pg_ctlcluster "$v" main stop >/dev/null 2>&1 || true
  done
fi
have_pg || { echo "error: postgresql installed but pg_ctl/initdb still not found" >&2; exit 1; }
