#!/usr/bin/env bash
# System packages the tests need: a headless Chromium to render the assessment report as a
# person's browser would, and opencv-doc's example photos (training photos for the
# chosen-inputs attack). Installed only when missing, and only where we may (root).
set -euo pipefail

# --- opencv-doc: ~40 real photos under /usr/share/doc/opencv-doc/examples that the
# chosen-inputs attack (src/infenclave/assess/attacks/training_data.py) trains its inverse
# network on; without it only ~12 skimage/matplotlib photos remain. Runs before the Chromium
# block because that block exits early once Chromium is present.
if [ ! -d /usr/share/doc/opencv-doc/examples/data ]; then
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null
  else
    echo "note: opencv-doc is missing and we are not root; the decoder attack trains on fewer photos" >&2
  fi
fi

# --- Photographs for the attack assessment (src/infenclave/assess/photosets.py): Debian
# desktop backgrounds that are photographs (evaluation and confirmation sets),
# ImageMagick's documentation photo (decoder training), and packages that carry photographs
# for other purposes (the confirmation set: jigsaw puzzles, annotation examples, manuals, a
# login theme; about 26 MB of downloads). Without them the evaluation set has only the 8
# built-in photos and every attacked cut gets "not enough evidence"; without the last six the
# chosen cut cannot be confirmed on photos that took no part in choosing it.
PHOTO_PACKAGES="mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 plasma-workspace-wallpapers \
  imagemagick-6-doc jigzo-data labelme-examples hugin-data palapeli-data libvips-doc sddm-theme-maldives"
if [ ! -d /usr/share/backgrounds/mate/nature ] || [ ! -f /usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg ] \
   || [ ! -d /usr/share/wallpapers/EveningGlow ] || [ ! -d /usr/share/doc/imagemagick-6-common/html/images ] \
   || [ ! -f /usr/share/games/jigzo/puzzles/00_default/windmill-4x4.pzl ] \
   || [ ! -d /usr/share/doc/labelme-examples/examples/classification ] \
   || [ ! -f /usr/share/hugin/xrc/data/help_en_EN/CA_fringes00.jpg ] \
   || [ ! -f /usr/share/palapeli/collection/citrus-fruits.jpg ] \
   || [ ! -f /usr/share/gtk-doc/html/libvips/owl.jpg ] \
   || [ ! -f /usr/share/sddm/themes/maldives/background.jpg ]; then
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086 # a list of package names
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PHOTO_PACKAGES >/dev/null
  else
    echo "note: photo packages are missing and we are not root; attack verdicts will lack evidence" >&2
  fi
fi

# --- strace (the sandbox's syscall allow-list is measured with `strace -f` on serving
# workers: src/infenclave/enclave/sandbox.py step 8) and util-linux's unshare/setpriv
# (tests/test_sandbox.py starts its ordinary-user worker through them).
if ! command -v strace >/dev/null 2>&1 || ! command -v setpriv >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace util-linux >/dev/null
  else
    echo "note: strace or setpriv is missing and we are not root; the ordinary-user sandbox test fails" >&2
  fi
fi

# --- iproute2's `ip`: tests/test_ray_serve.py brings loopback up in the network namespace
# (unshare -n) its Ray cluster runs in.
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
fi

# --- Chromium
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "note: chromium is missing and we are not root; the browser rendering test will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
