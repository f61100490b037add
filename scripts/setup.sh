#!/usr/bin/env bash
# Installs the Debian 12 packages taskmgr needs to build, test and run.
# Idempotent: when every package is already installed it changes nothing
# and does not touch the network.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git
  libboost1.81-dev libboost-json1.81-dev
  libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev
  libtesseract-dev libleptonica-dev tesseract-ocr tesseract-ocr-eng tesseract-ocr-osd
  libpoppler-cpp-dev poppler-utils qpdf
  libsqlitecpp-dev libsqlite3-dev sqlite3
  libpq-dev postgresql-15
  libfmt-dev doctest-dev libyaml-cpp-dev libbenchmark-dev
  fonts-dejavu-core python3 prometheus chromium wrk
  clang libclang-rt-14-dev clang-format
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
