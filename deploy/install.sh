#!/usr/bin/env bash
# Install (or upgrade) agent-supervisor as a systemd service, from this checkout.
#
#   sudo deploy/install.sh              # install or upgrade, then (re)start the service
#   sudo deploy/install.sh --no-start   # install or upgrade; leave the service as it is
#
# Idempotent: run it again after `git pull` to upgrade. It creates
#   - the system user and group `agent-supervisor` (the group is the operator group),
#   - /opt/agent-supervisor/venv with the project installed (not editable) from this checkout,
#     and /opt/agent-supervisor/docs,
#   - /usr/local/bin/agent-supervisor (the CLI for operators),
#   - /etc/agent-supervisor/config.yaml from config/example.yaml, only if absent,
#   - /etc/credstore/ (root-only, if absent: where the unit's LoadCredential= finds API keys),
#   - /etc/systemd/system/agent-supervisor.service,
# and validates the config before starting. State lives in /var/lib/agent-supervisor
# (StateDirectory=, created by systemd). Offline installs: pip honours PIP_NO_INDEX=1 and
# PIP_FIND_LINKS=/path/to/wheels. deploy/uninstall.sh reverses all of this.
set -euo pipefail

NAME=agent-supervisor
PREFIX=/opt/$NAME
VENV=$PREFIX/venv
ETC=/etc/$NAME
STATE=/var/lib/$NAME
UNIT=/etc/systemd/system/$NAME.service
BIN_LINK=/usr/local/bin/$NAME
SOCKET=/run/$NAME/control.sock
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
START=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --no-start) START=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
[ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/supervisor" ] || die "$SRC is not an agent-supervisor checkout"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Python 3.11 or newer is needed ($("$PYTHON" --version 2>&1))"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "the venv module is missing (apt-get install python3-venv)"

# -- user and group -------------------------------------------------------------------------
if ! getent group "$NAME" >/dev/null; then
    say "creating system group $NAME"
    groupadd --system "$NAME"
fi
if ! getent passwd "$NAME" >/dev/null; then
    say "creating system user $NAME"
    useradd --system --gid "$NAME" --home-dir "$STATE" --no-create-home \
        --shell /usr/sbin/nologin --comment "agent-supervisor daemon" "$NAME"
fi

# -- the venv ---------------------------------------------------------------------------------
install -d -m 0755 "$PREFIX"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
    say "creating $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
# Build from a copy: pip builds in the source tree, and the checkout may be read-only or
# belong to someone else.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./var \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache -cf - . \
    | tar -C "$build" -xf -
say "installing agent-supervisor into $VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$build"
"$VENV/bin/agent-supervisor" --version
rm -rf "$PREFIX/docs"
cp -r "$SRC/docs" "$PREFIX/docs"
chmod -R u=rwX,go=rX "$PREFIX/docs"
ln -sfn "$VENV/bin/agent-supervisor" "$BIN_LINK"

# -- config and credentials -------------------------------------------------------------------
install -d -m 0750 -o root -g "$NAME" "$ETC"
[ -d /etc/credstore ] || install -d -m 0700 -o root -g root /etc/credstore
if [ ! -e "$ETC/config.yaml" ]; then
    say "writing $ETC/config.yaml from config/example.yaml"
    tmp=$(mktemp "$ETC/.config.yaml.XXXXXX")
    {
        # The unit sets AGENT_SUPERVISOR_STATE_DIR and runs in the state dir, so the example's
        # relative paths (var/..., agents/data/...) land there; a param that names the state
        # dir gets the real one. The socket path is written out so the CLI of an operator
        # (who has no $RUNTIME_DIRECTORY) finds the daemon.
        sed -e "s|^state_dir:.*|# state_dir: $STATE    # set by the unit: AGENT_SUPERVISOR_STATE_DIR|" \
            -e "s|^\([[:space:]][[:space:]]*state_dir:\) var/state\b|\1 $STATE|" \
            "$SRC/config/example.yaml"
        printf '\ncontrol:\n  socket: %s   # keep in step with ExecReload= in the unit\n' "$SOCKET"
    } >"$tmp"
    chown root:"$NAME" "$tmp"
    chmod 0640 "$tmp"
    mv "$tmp" "$ETC/config.yaml"
    if [ -d "$SRC/agents/data" ]; then
        # the example agents' sample data, where the example config's relative paths point
        install -d -m 0750 -o "$NAME" -g "$NAME" "$STATE" "$STATE/agents"
        rm -rf "$STATE/agents/data"
        cp -r "$SRC/agents/data" "$STATE/agents/data"
        chown -R "$NAME:$NAME" "$STATE/agents"
        chmod -R u=rwX,g=rX,o= "$STATE/agents"
    fi
else
    say "keeping the existing $ETC/config.yaml"
fi

say "checking the config"
if ! AGENT_SUPERVISOR_STATE_DIR=$STATE "$VENV/bin/agent-supervisor" check --config "$ETC/config.yaml"; then
    die "$ETC/config.yaml is not valid: fix it, then run $0 again"
fi

# -- the unit ---------------------------------------------------------------------------------
install -m 0644 "$SRC/systemd/$NAME.service" "$UNIT"
if [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: unit installed, nothing started"
    START=0
else
    systemctl daemon-reload
    systemctl enable --quiet "$NAME.service"
    if [ "$START" = 1 ]; then
        # restart, not start: after an upgrade the new code must be the one running
        say "(re)starting $NAME.service"
        systemctl restart "$NAME.service"
        systemctl --no-pager --lines=0 status "$NAME.service" || true
    fi
fi

cat <<EOF

agent-supervisor is installed.
Next steps:
  - edit $ETC/config.yaml, then:  agent-supervisor check && sudo systemctl reload $NAME
  - API keys: put each in /etc/credstore/<name> (mode 0600): openai_api_key and
    anthropic_api_key are loaded by the unit; for other names add LoadCredential=<name>
    with 'sudo systemctl edit $NAME' (see docs/operations.md)
  - let an operator use the CLI without root:  sudo usermod -aG $NAME <user>  (then log in again)
  - agent-supervisor status        # every agent, its last run and next fire
  - journalctl -u $NAME -o cat -f | jq .
EOF
[ "$START" = 1 ] || echo "  - start it:  sudo systemctl enable --now $NAME"
