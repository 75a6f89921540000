#!/usr/bin/env bash
# Remove what deploy/install.sh installed.
#
#   sudo deploy/uninstall.sh           # stop and remove the service, the venv, the CLI link
#   sudo deploy/uninstall.sh --purge   # also the state, the config, the credentials, the user
#
# Without --purge the agents' state (/var/lib/agent-supervisor), the config
# (/etc/agent-supervisor) and the agent-supervisor user and group are kept, so a later
# install.sh picks up where this one left off. Drop-ins made with `systemctl edit` are kept
# unless --purge. API keys in /etc/credstore are never touched: that directory is shared.
set -euo pipefail

NAME=agent-supervisor
PREFIX=/opt/$NAME
ETC=/etc/$NAME
STATE=/var/lib/$NAME
UNIT=/etc/systemd/system/$NAME.service
BIN_LINK=/usr/local/bin/$NAME
PURGE=0

while [ $# -gt 0 ]; do
    case "$1" in
        --purge) PURGE=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '==> %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "uninstall.sh: run as root" >&2; exit 1; }

if [ -d /run/systemd/system ]; then
    if systemctl cat "$NAME.service" >/dev/null 2>&1; then
        say "stopping and disabling $NAME.service (runs in flight are drained)"
        systemctl disable --now --quiet "$NAME.service" || true
    fi
fi
rm -f "$UNIT"
[ "$PURGE" = 1 ] && rm -rf "$UNIT.d"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed "$NAME.service" 2>/dev/null || true
fi

if [ -L "$BIN_LINK" ] && [ "$(readlink "$BIN_LINK")" = "$PREFIX/venv/bin/$NAME" ]; then
    rm -f "$BIN_LINK"
fi
say "removing $PREFIX"
rm -rf "$PREFIX"

if [ "$PURGE" = 1 ]; then
    say "purging $STATE, $ETC and /run/$NAME"
    rm -rf "$STATE" "$ETC" "/run/$NAME"
    if getent passwd "$NAME" >/dev/null; then
        say "removing user $NAME"
        userdel "$NAME"
    fi
    if getent group "$NAME" >/dev/null; then
        say "removing group $NAME"
        groupdel "$NAME"
    fi
else
    echo "kept: $STATE (state), $ETC (config), user and group $NAME;"
    echo "      run with --purge to remove them too"
fi
say "agent-supervisor is uninstalled (API keys in /etc/credstore, if any, are left alone)"
