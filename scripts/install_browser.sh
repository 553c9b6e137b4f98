#!/usr/bin/env bash
# Install what the labelling page's browser test needs: Debian's chromium (/usr/bin/chromium)
# and the Python `playwright` package in the given virtualenv. Playwright's own browser download
# is never used (`playwright install` fails offline); the test points Playwright at
# /usr/bin/chromium instead.
#
# Usage: scripts/install_browser.sh [VENV_DIR]   (default .venv)
# Idempotent, and always exits 0: when something cannot be installed it says why, and the
# browser test then skips with that reason.
set -u
VENV=${1:-.venv}
PY="$VENV/bin/python"

if [ -x /usr/bin/chromium ]; then
  echo "install_browser: /usr/bin/chromium present"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get here; install chromium yourself (browser test will skip)"
elif [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "install_browser: not root and no sudo; run 'apt-get install -y chromium' as root (browser test will skip)"
else
  SUDO=""
  [ "$(id -u)" != 0 ] && SUDO="sudo -n"
  echo "install_browser: installing Debian chromium with apt-get"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; } >/tmp/install_browser.apt.log 2>&1; then
    echo "install_browser: apt-get could not install chromium (see /tmp/install_browser.apt.log); browser test will skip"
  fi
fi

if [ ! -x "$PY" ]; then
  echo "install_browser: no python at $PY; create the virtualenv first (make setup)"
elif "$PY" -c "import playwright" 2>/dev/null; then
  echo "install_browser: playwright present in $VENV"
elif ! "$PY" -m pip --disable-pip-version-check install -q "playwright>=1.40"; then
  echo "install_browser: pip could not install playwright into $VENV; browser test will skip"
fi
exit 0
