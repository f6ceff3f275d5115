#!/bin/sh
# Renders the application icon rewind.svg into the PNG sizes of the hicolor icon theme:
#
#   icons/hicolor/<N>x<N>/apps/rewind.png   for N in 16 22 24 32 48 64 128 256 512
#   icons/hicolor/scalable/apps/rewind.svg  a copy of rewind.svg
#
# The tree under icons/ maps 1:1 onto /usr/share/icons/hicolor/ (the Debian package installs
# it there), so a desktop entry's `Icon=rewind` finds the icon at every size.
#
# rewind-256.png (the window's own icon, embedded by app/src/gui/mod.rs, and the base of the
# tray icons, see make-tray-icons.sh) is left alone; after changing the SVG, copy
# icons/hicolor/256x256/apps/rewind.png over it, run make-tray-icons.sh and rebuild the app.
#
# Dates and other metadata are left out of the PNG files and they are losslessly recompressed
# (optipng, when installed), so running this again with the same tools gives the same bytes.
#
# Needs rsvg-convert (`apt-get install librsvg2-bin`); optipng is optional.
# Usage: sh assets/make-icons.sh
set -eu
cd "$(dirname "$0")"

if ! command -v rsvg-convert >/dev/null 2>&1; then
  echo "make-icons.sh: rsvg-convert is missing: install it (apt-get install librsvg2-bin)" >&2
  exit 1
fi

# render SIZE OUTPUT
render() {
  mkdir -p "$(dirname "$2")"
  rsvg-convert --width "$1" --height "$1" --keep-aspect-ratio --format png \
    --output "$2.tmp" rewind.svg
  if command -v optipng >/dev/null 2>&1; then
    optipng -quiet -o5 -strip all "$2.tmp"
  fi
  mv "$2.tmp" "$2"
}

for size in 16 22 24 32 48 64 128 256 512; do
  render "$size" "icons/hicolor/${size}x${size}/apps/rewind.png"
done
mkdir -p icons/hicolor/scalable/apps
cp rewind.svg icons/hicolor/scalable/apps/rewind.svg
