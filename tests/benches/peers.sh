#!/bin/sh
# Rewind beside its peers (issue 20): installs what the peer benchmark needs from Debian
# when it is missing, then runs tests/benches/peers.rs. As root (libvirt, apt-get, the
# page cache). Extra arguments go to cargo, e.g. `tests/benches/peers.sh --offline`.
#
#   REWIND_BENCH_ROUNDS=3                   rounds per change kind
#   REWIND_BENCH_CHANGES=repeated|random    one kind of 1 % change only (default both)
#
# virtnbdbackup comes from Debian's own package (bookworm: 1.9.15), which pulls
# python3-libnbd, python3-libvirt, nbdkit and qemu-utils' qemu-nbd through its Depends.
# It needs neither systemd nor KVM: it talks to the running libvirtd like Rewind does
# (the benchmark starts virtlogd/libvirtd by hand when their sockets are absent), and
# libvirt >= 7.6 enables incremental backup without a domain capability flag.
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "peers.sh: run as root (it installs packages and drives libvirt)" >&2
    exit 1
fi

missing=""
command -v virtnbdbackup >/dev/null 2>&1 || missing="$missing virtnbdbackup"
command -v virtnbdrestore >/dev/null 2>&1 || missing="$missing virtnbdbackup"
[ -x /usr/bin/time ] || missing="$missing time"
command -v qemu-img >/dev/null 2>&1 || missing="$missing qemu-utils"
if [ -n "$missing" ]; then
    echo "peers.sh: installing$missing" >&2
    # The package lists may be missing on a fresh machine.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y $missing; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
    fi
fi
echo "peers.sh: virtnbdbackup $(virtnbdbackup -V 2>&1 | head -n 1), $(qemu-img --version | head -n 1)" >&2

cd "$(dirname "$0")/../.."
exec cargo bench -p rewind-tests --bench peers "$@"
