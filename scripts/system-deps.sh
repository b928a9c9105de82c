#!/usr/bin/env bash
# Installs the system libraries the project needs: libturbojpeg (PyTurboJPEG loads it at run time)
# and ImageMagick 6 (the tests compare our palette remap to it pixel for pixel; the bench times it).
set -euo pipefail
need=()
ldconfig -p 2>/dev/null | grep -q 'libturbojpeg\.so' || need+=(libturbojpeg0)
command -v convert-im6.q16 >/dev/null 2>&1 || command -v magick >/dev/null 2>&1 || need+=(imagemagick)
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
  echo "installing system packages with sudo: ${need[*]}"
  sudo apt-get update -qq >/dev/null && sudo apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "missing system packages: ${need[*]}" >&2
  echo "install libjpeg-turbo (the TurboJPEG library) and ImageMagick with your system's package manager" >&2
  echo "  (macOS: brew install jpeg-turbo imagemagick; Fedora: dnf install turbojpeg ImageMagick)" >&2
  exit 1
fi
