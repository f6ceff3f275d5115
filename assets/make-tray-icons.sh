#!/bin/sh
# Regenerates the tray icons (tray-*.png, 64x64) from the app icon rewind-256.png.
#
# Each icon is the app icon with a status badge in its lower right corner:
#   tray-protected.png  green badge, white check mark     (every protected VM is fine)
#   tray-running.png    blue badge, three white dots      (a checkpoint or restore runs)
#   tray-attention.png  orange badge, white "!"           (something failed or needs you)
#   tray-idle.png       grey badge, white dash, grey icon (nothing is protected yet)
# The badge is drawn at 256 px and the result scaled down, so its edges are smooth. Only
# shapes are drawn (no text), so the output does not depend on the installed fonts, and
# dates are left out of the PNG files, so running this again gives the same bytes with the
# same ImageMagick. The app embeds the PNGs (app/src/gui/tray.rs); rebuild it after a change.
#
# Needs ImageMagick (`apt-get install imagemagick`). Usage: sh assets/make-tray-icons.sh
set -eu
cd "$(dirname "$0")"

if command -v magick >/dev/null 2>&1; then
  im=magick
elif command -v convert >/dev/null 2>&1; then
  im=convert
else
  echo "make-tray-icons.sh: ImageMagick is missing: install it (apt-get install imagemagick)" >&2
  exit 1
fi

# badge NAME COLOUR BASE-OPTIONS GLYPH-DRAWING...
badge() {
  name=$1 colour=$2 base=$3
  shift 3
  # shellcheck disable=SC2086 # $base holds zero or more options on purpose
  "$im" rewind-256.png $base \
    -fill white -stroke none -draw "circle 188,188 188,118" \
    -fill "$colour" -draw "circle 188,188 188,128" \
    "$@" \
    -resize 64x64 -strip -define png:exclude-chunks=date,time -define png:color-type=6 \
    "tray-$name.png"
}

badge protected '#2b9348' '' \
  -fill none -stroke white -strokewidth 17 \
  -draw "stroke-linecap round stroke-linejoin round polyline 160,190 181,211 217,166"
badge running '#2f80ed' '' \
  -fill white -stroke none \
  -draw "circle 162,188 162,177" -draw "circle 188,188 188,177" -draw "circle 214,188 214,177"
badge attention '#e8590c' '' \
  -fill white -stroke none \
  -draw "roundrectangle 179,146 197,200 9,9" -draw "circle 188,220 188,209"
badge idle '#868e96' '-colorspace Gray -colorspace sRGB' \
  -fill none -stroke white -strokewidth 17 \
  -draw "stroke-linecap round line 164,188 212,188"
