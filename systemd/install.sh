#!/bin/sh
# Installs rsbroker as a systemd service on this host:
#   the binary          -> $PREFIX/bin/rsbroker (PREFIX=/usr/local)
#   the unit            -> /etc/systemd/system/rsbroker.service
#   the example config  -> /etc/rsbroker/rsbroker.toml (an existing one is kept)
#   the README          -> $PREFIX/share/doc/rsbroker/README.md
# then checks the config and reloads systemd. Start it with
#   systemctl enable --now rsbroker
#
# usage: systemd/install.sh [BINARY]   (default: target/release/rsbroker)
# DESTDIR=/some/root installs under that root instead (for packaging and
# tests), and does not touch systemd.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
bin=${1:-$root/target/release/rsbroker}
prefix=${PREFIX:-/usr/local}
dest=${DESTDIR:-}

if [ ! -x "$bin" ]; then
    echo "install.sh: $bin is not there; build it first: cargo build --release -p rsbroker" >&2
    exit 1
fi

install -D -m 0755 "$bin" "$dest$prefix/bin/rsbroker"
sed "s#/usr/local/bin/rsbroker#$prefix/bin/rsbroker#g" "$here/rsbroker.service" > "$here/.rsbroker.service.tmp"
install -D -m 0644 "$here/.rsbroker.service.tmp" "$dest/etc/systemd/system/rsbroker.service"
rm -f "$here/.rsbroker.service.tmp"
if [ -e "$dest/etc/rsbroker/rsbroker.toml" ]; then
    echo "install.sh: keeping the existing $dest/etc/rsbroker/rsbroker.toml"
else
    install -D -m 0644 "$here/rsbroker.toml" "$dest/etc/rsbroker/rsbroker.toml"
fi
install -D -m 0644 "$root/README.md" "$dest$prefix/share/doc/rsbroker/README.md"
install -D -m 0644 "$here/README.md" "$dest$prefix/share/doc/rsbroker/systemd.md"

"$dest$prefix/bin/rsbroker" --check-config --config "$dest/etc/rsbroker/rsbroker.toml"

if [ -z "$dest" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "install.sh: installed; start it with: systemctl enable --now rsbroker"
else
    echo "install.sh: installed under ${dest:-/}"
fi
