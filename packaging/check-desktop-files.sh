#!/bin/sh
# Checks the desktop-integration files that the Debian package installs, as installed:
#
#   - the AppStream metainfo with `appstreamcli validate --no-net` (errors and warnings fail;
#     infos and pedantic notes are printed only);
#   - the same files laid out as under /usr (metainfo, the application's desktop entry, the
#     hicolor icons) with `appstreamcli validate-tree`: the metainfo's launchable names a
#     desktop entry that exists, and its icon is there;
#   - the application entry and the tray's autostart entry with `desktop-file-validate`
#     (errors fail; hints are printed only);
#   - that the entries' Icon= and the metainfo's <launchable> agree with the files.
#
# Exits non-zero if anything fails. Needs appstream and desktop-file-utils
# (`apt-get install appstream desktop-file-utils`).
# Usage: sh packaging/check-desktop-files.sh
set -eu
cd "$(dirname "$0")"

id=io.github.rewindvm.Rewind
metainfo=$id.metainfo.xml
app_entry=$id.desktop
tray_entry=rewind-tray.desktop
icons=../assets/icons/hicolor

for tool in appstreamcli desktop-file-validate; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "check-desktop-files.sh: $tool is missing: apt-get install appstream desktop-file-utils" >&2
    exit 1
  fi
done

failed=0
fail() { echo "check-desktop-files.sh: $*" >&2; failed=1; }

echo "== appstreamcli validate --no-net $metainfo"
appstreamcli validate --no-net "$metainfo" || fail "$metainfo is not valid AppStream metadata"

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/usr/share/metainfo" "$tree/usr/share/applications" "$tree/usr/share/icons"
cp "$metainfo" "$tree/usr/share/metainfo/"
cp "$app_entry" "$tree/usr/share/applications/"
cp -R "$icons" "$tree/usr/share/icons/"
echo "== appstreamcli validate-tree --no-net (metainfo, desktop entry and icons as under /usr)"
appstreamcli validate-tree --no-net "$tree" || fail "the installed tree does not validate"

echo "== desktop-file-validate $app_entry $tray_entry"
desktop-file-validate "$app_entry" "$tray_entry" || fail "a desktop entry is not valid"

# Cross-checks the validators do not make.
grep -q "<launchable type=\"desktop-id\">$app_entry</launchable>" "$metainfo" ||
  fail "$metainfo: its launchable is not $app_entry"
grep -q "<id>$id</id>" "$metainfo" || fail "$metainfo: its <id> is not $id"
for entry in "$app_entry" "$tray_entry"; do
  icon=$(sed -n 's/^Icon=//p' "$entry")
  [ -f "$icons/scalable/apps/$icon.svg" ] || fail "$entry: Icon=$icon has no $icons/scalable/apps/$icon.svg"
  for size in 16 22 24 32 48 64 128 256 512; do
    [ -f "$icons/${size}x${size}/apps/$icon.png" ] ||
      fail "$entry: Icon=$icon has no $icons/${size}x${size}/apps/$icon.png (run assets/make-icons.sh)"
  done
done
grep -q '^Exec=rewind tray$' "$tray_entry" || fail "$tray_entry does not run \`rewind tray\`"

if [ "$failed" = 0 ]; then
  echo "check-desktop-files.sh: all desktop files are valid"
fi
exit "$failed"
