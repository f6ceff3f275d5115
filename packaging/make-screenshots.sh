#!/bin/sh
# Takes the screenshots that the AppStream metainfo shows (assets/screenshots/*.png) from the
# real Rewind window, protecting real (tiny) virtual machines:
#
#   main.png     the window at 1280x800: the VM list, a protected VM's timeline with its
#                checkpoints, the activity log
#   restore.png  the same window with a checkpoint picked on the timeline, ready to restore
#
# What it does, as root, on a machine set up like the CI's (./x test installs the packages):
#   1. starts virtlogd/libvirtd if they are not running (and stops them again at the end if
#      nothing else uses them by then);
#   2. defines three throwaway domains of the test guest (a Debian cloud kernel and a busybox
#      initramfs, booted directly under TCG): "Windows 11" (UEFI, Secure Boot, TPM 2.0),
#      "Fedora Workstation" (both started) and "Ubuntu Server" (left shut off, unprotected);
#   3. protects the two running ones into a store in a folder called BACKUP (as if it were a
#      removable drive) and takes a few real checkpoints with the CLI (one with memory);
#   4. opens the window under a private Xvfb, makes it 1280x800 (16:10), waits until it has
#      drawn, captures it with ImageMagick's `import`, picks the newest checkpoint on the
#      timeline with xdotool and captures again;
#   5. writes the PNGs, stripped and (with optipng) recompressed, to the output folder.
# Every domain, file, store and process it made is removed on exit, also on failure or
# Ctrl-C (trap). Its domains carry the test harness's marker with this script's PID, so the
# integration tests' set-up sweeps them away too should this script be killed with SIGKILL.
#
# Needs: xvfb, xauth, xdotool, imagemagick, libvirt + QEMU + OVMF + swtpm (./x test installs
# them), optionally optipng; and the cached test guest under target/rewind-test-guest/,
# which any integration test that boots a VM builds (e.g.
# `cargo test -p rewind --test integration -- gui`), or REWIND_GUEST_DIR pointing at a folder
# with vmlinuz and initrd.img.
#
# Usage: packaging/make-screenshots.sh [PATH-TO-rewind] [OUTPUT-FOLDER]
#   defaults: target/debug/rewind (build it with `cargo build -p rewind`), assets/screenshots
#   HOLD=SECONDS keeps everything that long before cleaning up, to look at the window
#   (`DISPLAY=:N import -window root x.png`; the script prints N) after a layout change.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
rewind=${1:-$root/target/debug/rewind}
out=${2:-$root/assets/screenshots}
uri=qemu:///system
width=1280
height=800

say() { printf 'make-screenshots: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run this as root: it defines VMs on qemu:///system and may start libvirtd"
[ -x "$rewind" ] || die "no rewind binary at $rewind: build it with \`cargo build -p rewind\` or pass its path"
for tool in Xvfb xdotool import virsh qemu-img; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing: install xvfb xdotool imagemagick libvirt-clients qemu-utils (./x test does)"
done
if [ -n "${REWIND_GUEST_DIR:-}" ]; then
  guest=$REWIND_GUEST_DIR
else
  guest=$(ls -dt "$root"/target/rewind-test-guest/*/ 2>/dev/null | head -n 1)
fi
[ -n "$guest" ] && [ -f "$guest/vmlinuz" ] && [ -f "$guest/initrd.img" ] ||
  die "no test guest (vmlinuz, initrd.img) under target/rewind-test-guest/: run an integration test that boots a VM once (cargo test -p rewind --test integration -- gui), or set REWIND_GUEST_DIR"

# Everything this script makes, for cleanup().
tmp=
xvfb_pid=
app_pid=
virtlogd_pid=
libvirtd_pid=
domains=

remove_domain() {
  virsh -q -c "$uri" destroy "$1" >/dev/null 2>&1 || true
  virsh -q -c "$uri" undefine "$1" --nvram --tpm --checkpoints-metadata --snapshots-metadata \
    --managed-save >/dev/null 2>&1 || true
}

stop() { # PID: TERM, then KILL after 5 s
  [ -n "$1" ] || return 0
  kill "$1" 2>/dev/null || return 0
  i=0
  while kill -0 "$1" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

cleanup() {
  status=$?
  trap - EXIT INT TERM HUP
  stop "$app_pid"
  stop "$xvfb_pid"
  for dom in $domains; do remove_domain "$(printf %s "$dom" | tr _ ' ')"; done
  if [ -n "$libvirtd_pid" ]; then
    # Started here: stop it again, unless something else defined domains meanwhile.
    if [ -z "$(virsh -q -c "$uri" list --all --name 2>/dev/null | tr -d '[:space:]')" ]; then
      stop "$libvirtd_pid"
    else
      say "leaving libvirtd (PID $libvirtd_pid) running: other domains are defined now"
    fi
  fi
  if [ -n "$virtlogd_pid" ] && ! kill -0 "${libvirtd_pid:-0}" 2>/dev/null; then
    stop "$virtlogd_pid"
  fi
  [ -n "$tmp" ] && rm -rf "$tmp"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# A folder QEMU (user libvirt-qemu) can reach.
tmp=$(mktemp -d /var/tmp/rewind-screenshots.XXXXXX)
chmod 755 "$tmp"

# 1. libvirt
answers() { [ -S "$1" ] && virsh -q -c "$uri" version >/dev/null 2>&1; }
if ! virsh -q -c "$uri" version >/dev/null 2>&1; then
  say "starting virtlogd and libvirtd"
  if ! pgrep -x virtlogd >/dev/null; then
    rm -f /var/run/libvirt/virtlogd-sock /var/run/libvirt/virtlogd-admin-sock
    virtlogd >"$tmp/virtlogd.log" 2>&1 &
    virtlogd_pid=$!
    sleep 1
  fi
  rm -f /var/run/libvirt/libvirt-sock /var/run/libvirt/libvirt-sock-ro
  libvirtd >"$tmp/libvirtd.log" 2>&1 &
  libvirtd_pid=$!
  i=0
  until answers /var/run/libvirt/libvirt-sock; do
    i=$((i + 1))
    [ $i -lt 100 ] || die "libvirtd does not answer after 20 s: $(tail -n 5 "$tmp/libvirtd.log")"
    sleep 0.2
  done
fi

# 2. the VMs
# define NAME MEMORY-MiB UEFI(0|1) WORKLOAD
define() {
  slug=$(printf %s "$1" | tr ' ' _)
  dir=$tmp/vm-$slug
  mkdir -p "$dir"
  cp "$guest/vmlinuz" "$guest/initrd.img" "$dir/"
  qemu-img create -q -f qcow2 "$dir/disk.qcow2" 64M
  if [ "$3" = 1 ]; then
    os_attr=" firmware='efi'" machine=q35 features="<acpi/><smm state='on'/>"
    tpm="<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
  else
    os_attr= machine=pc features="<acpi/>" tpm=
  fi
  # fswrite: an ext4 file system on vda that the guest writes to, which the guest agent
  # freezes for application-consistent checkpoints.
  fs=
  [ "$4" != fswrite ] || fs=" rw.fs=vda"
  cat >"$dir/domain.xml" <<EOF
<domain type='qemu'>
  <name>$1</name>
  <metadata><rwt:harness xmlns:rwt='https://rewind.invalid/test-harness/1' pid='$$'/></metadata>
  <memory unit='MiB'>$2</memory>
  <vcpu>1</vcpu>
  <os$os_attr>
    <type arch='x86_64' machine='$machine'>hvm</type>
    <kernel>$dir/vmlinuz</kernel>
    <initrd>$dir/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 rw.workload=$4 rw.disk=vda rw.agent=1$fs</cmdline>
  </os>
  <features>$features</features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$dir/disk.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='$dir/console.log'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    $tpm
    <memballoon model='none'/>
  </devices>
</domain>
EOF
  virsh -q -c "$uri" dominfo "$1" >/dev/null 2>&1 && die "a domain called \"$1\" exists already: remove it first"
  domains="$domains $slug"
  virsh -q -c "$uri" define "$dir/domain.xml" >/dev/null
}

wait_ready() { # NAME
  console=$tmp/vm-$(printf %s "$1" | tr ' ' _)/console.log
  i=0
  until grep -q 'REWIND-GUEST READY' "$console" 2>/dev/null; do
    i=$((i + 1))
    [ $i -lt 600 ] || die "\"$1\" did not boot in 2 minutes: $(tail -n 5 "$console" 2>/dev/null)"
    sleep 0.2
  done
}

say "defining and booting the VMs (TCG: about half a minute)"
define "Windows 11" 256 1 fswrite
define "Fedora Workstation" 192 0 fswrite
define "Ubuntu Server" 192 0 idle
virsh -q -c "$uri" start "Windows 11" >/dev/null
virsh -q -c "$uri" start "Fedora Workstation" >/dev/null
wait_ready "Fedora Workstation"
wait_ready "Windows 11"

# 3. protection and checkpoints, with private configuration and state
home=$tmp/home
mkdir -p "$home/runtime" "$home/BACKUP"
chmod 700 "$home/runtime"
store=$home/BACKUP/rewind
export REWIND_CONFIG_DIR="$home/rewind-config" REWIND_STATE_DIR="$home/rewind-state"
export XDG_CONFIG_HOME="$home/config" XDG_DATA_HOME="$home/data" XDG_STATE_HOME="$home/state"
export XDG_CACHE_HOME="$home/cache" XDG_RUNTIME_DIR="$home/runtime"
unset WAYLAND_DISPLAY LIBVIRT_DEFAULT_URI DBUS_SESSION_BUS_ADDRESS

rw() { "$rewind" "$@" --connect "$uri" >>"$tmp/cli.log" 2>&1 || die "rewind $* failed: $(tail -n 5 "$tmp/cli.log")"; }

say "protecting the VMs and taking checkpoints (about two minutes)"
keep="--keep-last 20 --keep-hourly 24 --keep-daily 14 --keep-weekly 8"
# shellcheck disable=SC2086 # $keep holds several options on purpose
rw protect "Windows 11" --to "$store" --every 1h $keep
# shellcheck disable=SC2086
rw protect "Fedora Workstation" --to "$store" --every 30m $keep
# Spread out so that they stand apart on the timeline at its closest zoom (10 minutes wide).
rw checkpoint "Windows 11" "Fedora Workstation" --to "$store"
sleep 30
rw checkpoint "Windows 11" --to "$store"
sleep 30
rw checkpoint "Windows 11" --to "$store" --full-state
sleep 30
rw checkpoint "Windows 11" "Fedora Workstation" --to "$store"
sleep 20

# 4. the window
say "opening the window under Xvfb"
Xvfb -displayfd 3 -nolisten tcp -noreset -screen 0 "${width}x${height}x24" \
  3>"$tmp/display" 2>"$tmp/xvfb.log" &
xvfb_pid=$!
i=0
until [ -s "$tmp/display" ]; do
  i=$((i + 1))
  [ $i -lt 100 ] || die "Xvfb reported no display: $(cat "$tmp/xvfb.log")"
  sleep 0.1
done
DISPLAY=:$(tr -d '[:space:]' <"$tmp/display")
export DISPLAY

"$rewind" --connect "$uri" >"$tmp/app.log" 2>&1 &
app_pid=$!
i=0
until win=$(xdotool search --onlyvisible --name '^Rewind$' 2>/dev/null | head -n 1) && [ -n "$win" ]; do
  i=$((i + 1))
  kill -0 "$app_pid" 2>/dev/null || die "the window exited: $(tail -n 20 "$tmp/app.log")"
  [ $i -lt 300 ] || die "no Rewind window after 60 s: $(tail -n 20 "$tmp/app.log")"
  sleep 0.2
done
xdotool windowmove "$win" 0 0 windowsize "$win" "$width" "$height"

# Whether domains other than this script's are defined (a test running meanwhile): the
# window would list them.
foreign_domains() {
  virsh -q -c "$uri" list --all --name 2>/dev/null | tr ' ' _ | while read -r name; do
    case " $domains " in *" $name "*) ;; *) [ -z "$name" ] || echo "$name" ;; esac
  done
}

# Waits until two captures 2 s apart are identical (the window has drawn and settled; its
# clock-driven parts redraw once a minute) and no other domain is defined, then writes the
# picture to FILE.
capture() { # FILE
  prev=
  i=0
  noted=
  while :; do
    sleep 2
    import -window root "$tmp/shot.png"
    sum=$(identify -format '%#' "$tmp/shot.png")
    others=$(foreign_domains)
    if [ -n "$others" ]; then
      [ -n "$noted" ] || say "waiting for other domains to go away: $(echo $others)"
      noted=1
      sum=
    fi
    [ -n "$sum" ] && [ "$sum" = "$prev" ] && break
    prev=$sum
    i=$((i + 1))
    [ $i -lt 300 ] || die "the window does not settle, or other domains stay defined"
  done
  kill -0 "$app_pid" 2>/dev/null || die "the window exited: $(tail -n 20 "$tmp/app.log")"
  mkdir -p "$(dirname "$1")"
  convert "$tmp/shot.png" -strip -define png:exclude-chunks=date,time "$1"
  if command -v optipng >/dev/null 2>&1; then optipng -quiet -o5 -strip all "$1"; fi
  say "wrote $1"
}

# Where things are in the 1280x800 window (egui lays it out the same way every time; adjust
# these after a layout change and look at the pictures). The VM list's width depends on its
# contents, so what lies right of it is found from the pixels where it can be.
vm_in_list="72 160"       # "Windows 11", third in the VM list, before anything is selected
row_x0=240                # the timeline's row, from left of its start (which moves with the
row_width=1024            # VM list's width) to the window's right edge
dots_y=150                # the middle of the checkpoints' dots
now_y=137                 # above the dots, where only the red "now" line crosses
restore_button="226 469"  # "Restore…" under the picked checkpoint's details
park="700 780"            # somewhere the pointer highlights nothing

click() { xdotool mousemove --sync "$1" "$2" click 1; sleep 0.5; }

# pixels IMAGE Y: the row Y of the timeline as lines "X R G B"
pixels() {
  convert "$1" -crop "${row_width}x1+${row_x0}+$2" txt:- |
    awk -F'[(),:]' -v x0="$row_x0" 'NR > 1 { print $1 + x0, $4, $5, $6 }'
}

# now_x IMAGE: where the red "now" line is (empty if it is not in view)
now_x() {
  pixels "$1" "$now_y" | awk '$2 > 140 && $3 < 110 && $4 < 110 && $2 - $3 > 70 { print $1; exit }'
}

# newest_x IMAGE: the centre of the rightmost coloured run of pixels wider than the "now"
# line in the dots' row: the newest checkpoint
newest_x() {
  pixels "$1" "$dots_y" | awk '
    BEGIN { start = -1; centre = "" }
    {
      max = $2; if ($3 > max) max = $3; if ($4 > max) max = $4
      min = $2; if ($3 < min) min = $3; if ($4 < min) min = $4
      if (max - min > 60) {
        if (start < 0 || $1 != last + 1) start = $1
        last = $1
        if (last - start >= 6) centre = int((start + last) / 2)
      }
    }
    END { print centre }'
}

# zoom_at_now CLICKS: turns the mouse wheel CLICKS times over the "now" line (zooming in
# around it)
zoom_at_now() {
  capture "$tmp/zoom.png"
  x=$(now_x "$tmp/zoom.png")
  [ -n "$x" ] || die "no \"now\" line on the timeline (see $tmp/zoom.png; keep it with HOLD=600)"
  xdotool mousemove --sync "$x" "$dots_y"
  j=0
  while [ $j -lt "$1" ]; do xdotool click 4; sleep 0.05; j=$((j + 1)); done
  # shellcheck disable=SC2086 # the coordinates are two words on purpose
  xdotool mousemove --sync $park
}

capture "$tmp/first.png"
# shellcheck disable=SC2086
click $vm_in_list
# From the default (days) to the closest zoom (ten minutes wide), in steps, as the "now" line
# is found more precisely at each.
zoom_at_now 8
zoom_at_now 8
zoom_at_now 12
capture "$tmp/timeline.png"
x=$(newest_x "$tmp/timeline.png")
[ -n "$x" ] || die "found no checkpoint on the timeline (see $tmp/timeline.png)"
click "$x" "$dots_y"
# shellcheck disable=SC2086
xdotool mousemove --sync $park
capture "$out/main.png"

# shellcheck disable=SC2086
click $restore_button
# shellcheck disable=SC2086
xdotool mousemove --sync $park
capture "$out/restore.png"

if [ -n "${HOLD:-}" ]; then
  say "holding for $HOLD s: DISPLAY=$DISPLAY, files in $tmp"
  sleep "$HOLD"
fi
