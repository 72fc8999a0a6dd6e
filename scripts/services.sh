#!/usr/bin/env bash
# Local services for the outbox-cdc test suite, on Debian/Ubuntu, without Docker:
#
#   PostgreSQL 15 + wal2json  (apt, Debian cluster 15/main)   127.0.0.1:5432 (TLS too: ssl=on)
#   Apache Kafka 4.x, KRaft    (jars from Maven Central)       127.0.0.1:9092 (controller 9093,
#                                                              SASL_SSL 9095, mutual TLS 9096)
#   MariaDB                    (apt)                           127.0.0.1:3306
#
# TLS: a local test CA and a server certificate (SANs localhost and 127.0.0.1), generated once
# with openssl into $CACHE_DIR/tls, serve PostgreSQL's TLS and Kafka's SASL_SSL and SSL listeners.
# The role outbox_tls may only log in over TLS (pg_hba hostssl/hostnossl reject); plaintext logins
# of the other roles keep working.
#
# Usage: scripts/services.sh up|down|status
#        scripts/services.sh start|stop|restart postgres|kafka|mysql
#
#   up       install what is missing, configure, start, wait until each service answers a real
#            request, and write .services.env (source it before running pytest). Idempotent: when
#            everything already runs and is configured, it changes nothing and returns in seconds.
#   down     stop the services that `up` started (recorded in the state file), nothing else.
#   status   state and versions of each service.
#   start/stop/restart NAME
#            for fault injection in tests (tests find this script via
#            $OUTBOX_CDC_TEST_SERVICES_SCRIPT). `start` waits until the service is ready.
#
# Runs as root, or through sudo when not root. Kafka jars, its data and log live in
# ${OUTBOX_CDC_CACHE:-$HOME/.cache/outbox-cdc} (Maven's own cache is ~/.m2).
set -euo pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT_PATH="$ROOT_DIR/scripts/$(basename "${BASH_SOURCE[0]}")"
CACHE_DIR="${OUTBOX_CDC_CACHE:-$HOME/.cache/outbox-cdc}"
STATE_FILE="$CACHE_DIR/started-by-up"
ENV_FILE="$ROOT_DIR/.services.env"
SERVICES=(postgres kafka mysql)

# --- TLS (local test CA) ----------------------------------------------------------------------
TLS_DIR="$CACHE_DIR/tls"
TLS_CA="$TLS_DIR/ca.crt"
TLS_OTHER_CA="$TLS_DIR/other-ca.crt"   # a CA that signed nothing here: the "wrong CA" of tests
TLS_SERVER_CERT="$TLS_DIR/server.crt"
TLS_SERVER_PEM="$TLS_DIR/server-keystore.pem"   # key + certificate, Kafka's PEM keystore
TLS_CLIENT_CERT="$TLS_DIR/client.crt"
TLS_CLIENT_KEY="$TLS_DIR/client.key"

# --- PostgreSQL ---------------------------------------------------------------------------
PG_VERSION=15
PG_CLUSTER=main
PG_PORT=5432
PG_CONF_DIR="/etc/postgresql/$PG_VERSION/$PG_CLUSTER"
PG_DROPIN="$PG_CONF_DIR/conf.d/outbox-cdc.conf"
PG_HBA="$PG_CONF_DIR/pg_hba.conf"
PG_PACKAGES=("postgresql-$PG_VERSION" "postgresql-$PG_VERSION-wal2json")
PG_URL="postgresql://outbox:outbox@127.0.0.1:$PG_PORT/outbox_test"
PG_ADMIN_URL="postgresql://outbox_admin:outbox_admin@127.0.0.1:$PG_PORT/outbox_test"
PG_TLS_DIR="$PG_CONF_DIR/outbox-cdc-tls"
# A role that may only log in over TLS, with a distinctive password (the secret-leak tests look
# for it in everything the relay prints); member of outbox, so it uses the test database as it.
PG_TLS_USER=outbox_tls
PG_TLS_PASSWORD=pg-tls-Pw-9d4e7b1c
PG_TLS_URL="postgresql://$PG_TLS_USER:$PG_TLS_PASSWORD@localhost:$PG_PORT/outbox_test?sslmode=verify-full&sslrootcert=$TLS_CA"
# settings that need a server restart (the rest of the drop-in only needs a reload)
PG_RESTART_SETTINGS=(wal_level=logical max_replication_slots=40 max_wal_senders=40
    listen_addresses=localhost)

# --- Kafka ----------------------------------------------------------------------------------
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
# A second plaintext listener for the fault-injection tests: the broker advertises it at the
# address of the test suite's fault proxy (tests/support/faultproxy.py), which forwards to it, so
# that every connection a client opens after bootstrap also goes through the proxy.
KAFKA_FAULT_PORT=9094
KAFKA_FAULT_PROXY_PORT=19094
# SASL_SSL (PLAIN and SCRAM-SHA-512, user $KAFKA_SASL_USER) and SSL with a required client
# certificate (mutual TLS), both with the local CA's server certificate.
KAFKA_SASL_PORT=9095
KAFKA_MTLS_PORT=9096
KAFKA_SASL_USER=relay
KAFKA_SASL_PASSWORD=kafka-sasl-Pw-3f8a2c6e
KAFKA_SRC="$ROOT_DIR/scripts/kafka"
KAFKA_HOME="$CACHE_DIR/kafka"
KAFKA_LIB="$KAFKA_HOME/lib"
KAFKA_DATA="$KAFKA_HOME/data"
KAFKA_CONF="$KAFKA_HOME/server.properties"
KAFKA_LOG4J="$KAFKA_HOME/log4j2.properties"
KAFKA_PID="$KAFKA_HOME/kafka.pid"
KAFKA_LOG="$KAFKA_HOME/kafka.log"
KAFKA_HEAP="${OUTBOX_CDC_KAFKA_HEAP:-512m}"
KAFKA_READY_TIMEOUT="${OUTBOX_CDC_KAFKA_READY_TIMEOUT:-120}"

# --- MariaDB --------------------------------------------------------------------------------
MYSQL_PORT=3306
MYSQL_PACKAGES=(mariadb-server mariadb-client)
MYSQL_DROPIN=/etc/mysql/mariadb.conf.d/99-outbox-cdc.cnf
MYSQL_URL="mysql://outbox:outbox@127.0.0.1:$MYSQL_PORT/outbox_test"

UP_INSTALL=- UP_READY=- UP_HOW=""
READY_TIMEOUT="${OUTBOX_CDC_READY_TIMEOUT:-60}"

# ============================================================================================
# helpers
# ============================================================================================
log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    SUDO=()
fi
as_root() {
    if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
        die "need root for: $* (run as root, or install sudo)"
    fi
    "${SUDO[@]}" "$@"
}
as_postgres() { as_root runuser -u postgres -- "$@"; }

# print the last lines of a log file to stderr
log_tail() {
    local file=$1 n=${2:-40}
    if as_root test -r "$file"; then
        printf -- '----- last %s lines of %s -----\n' "$n" "$file" >&2
        as_root tail -n "$n" "$file" >&2 || true
        printf -- '-----\n' >&2
    fi
}

# Daemons started from here must not inherit the caller's descriptors above 2: neither a pipe
# (a CI runner waiting for its EOF would hang) nor this script's lock (fd 9).
close_extra_fds() {
    local fd
    for fd in "/proc/$BASHPID/fd"/*; do
        fd=${fd##*/}
        if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
}
# run "$@" (a command that leaves a daemon behind, and returns) with those descriptors closed
without_extra_fds() { (close_extra_fds; "$@"); }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# install root-owned file $2 with the content of file $1 if it differs; status 0 = changed
install_if_changed() {
    local src=$1 dst=$2
    if as_root test -f "$dst" && as_root cmp -s "$src" "$dst"; then
        return 1
    fi
    as_root install -m 0644 "$src" "$dst"
    return 0
}

missing_packages() {
    local p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [ "$status" = "install ok installed" ] || printf '%s\n' "$p"
    done
}

# apt-get install the packages that are missing; apt-get update only when something is missing
apt_ensure() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    [ ${#missing[@]} -gt 0 ] || return 0
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
    log "installing ${missing[*]} (apt)"
    local apt_opts=(-y -q --no-install-recommends
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
        || die "apt-get update failed"
    local p candidate
    for p in "${missing[@]}"; do
        candidate=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ { print $2 }')
        if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
            case $p in
                postgresql-15*) die "apt has no $p here. PostgreSQL 15 is in Debian 12; on other releases add the PostgreSQL apt repository (apt.postgresql.org), then rerun" ;;
                *) die "apt has no package $p here" ;;
            esac
        fi
    done
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${missing[@]}" \
        >/dev/null || die "apt-get install ${missing[*]} failed"
}

python_with_kafka() {
    local py
    for py in "$ROOT_DIR/.venv/bin/python" python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import kafka' >/dev/null 2>&1; then
            printf '%s\n' "$py"
            return 0
        fi
    done
    return 1
}

state_has() { [ -f "$STATE_FILE" ] && grep -qx "$1" "$STATE_FILE"; }
state_add() {
    mkdir -p "$CACHE_DIR"
    state_has "$1" || printf '%s\n' "$1" >>"$STATE_FILE"
}
state_remove() {
    [ -f "$STATE_FILE" ] || return 0
    local rest
    rest=$(grep -vx "$1" "$STATE_FILE" || true)
    if [ -n "$rest" ]; then printf '%s\n' "$rest" >"$STATE_FILE"; else rm -f "$STATE_FILE"; fi
}

# ============================================================================================
# TLS: local CA, server and client certificates (once; openssl)
# ============================================================================================
tls_make_ca() {
    local key=$1 crt=$2 cn=$3
    openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 -keyout "$key" -out "$crt" \
        -subj "/CN=$cn" -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign >/dev/null 2>&1
}

# tls_sign DIR NAME CN EXTENDED_KEY_USAGE [SAN]: DIR/NAME.key (PKCS#8, unencrypted), DIR/NAME.crt
tls_sign() {
    local dir=$1 name=$2 cn=$3 eku=$4 san=${5:-} ext
    ext="$dir/$name.ext"
    {
        echo 'basicConstraints=critical,CA:FALSE'
        echo 'keyUsage=critical,digitalSignature,keyEncipherment'
        echo "extendedKeyUsage=$eku"
        echo 'subjectKeyIdentifier=hash'
        echo 'authorityKeyIdentifier=keyid,issuer'
        [ -z "$san" ] || echo "subjectAltName=$san"
    } >"$ext"
    openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/$name.key" -out "$dir/$name.csr" \
        -subj "/CN=$cn" >/dev/null 2>&1 || return 1
    openssl x509 -req -sha256 -days 3650 -in "$dir/$name.csr" -CA "$dir/ca.crt" \
        -CAkey "$dir/ca.key" -set_serial "0x$(openssl rand -hex 16)" -extfile "$ext" \
        -out "$dir/$name.crt" >/dev/null 2>&1 || return 1
    rm -f "$dir/$name.csr" "$ext"
}

# the CA, a second CA (signs nothing), the server certificate (SANs localhost, 127.0.0.1) and a
# client certificate; generated once (kept while they verify against the CA)
tls_ensure() {
    if [ -s "$TLS_CA" ] && [ -s "$TLS_OTHER_CA" ] && [ -s "$TLS_SERVER_PEM" ] \
        && [ -s "$TLS_CLIENT_KEY" ] && openssl verify -CAfile "$TLS_CA" "$TLS_SERVER_CERT" \
        "$TLS_CLIENT_CERT" >/dev/null 2>&1; then
        return 0
    fi
    command -v openssl >/dev/null 2>&1 || apt_ensure openssl
    log "tls: generating a local CA and certificates in $TLS_DIR"
    local tmp="$TLS_DIR.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    chmod 0755 "$tmp"
    tls_make_ca "$tmp/ca.key" "$tmp/ca.crt" "outbox-cdc test CA" \
        || die "tls: openssl could not create the CA"
    tls_make_ca "$tmp/other-ca.key" "$tmp/other-ca.crt" "outbox-cdc other test CA" \
        || die "tls: openssl could not create the other CA"
    rm -f "$tmp/other-ca.key"
    tls_sign "$tmp" server localhost serverAuth "DNS:localhost,IP:127.0.0.1" \
        || die "tls: openssl could not sign the server certificate"
    tls_sign "$tmp" client relay-client clientAuth \
        || die "tls: openssl could not sign the client certificate"
    cat "$tmp/server.key" "$tmp/server.crt" >"$tmp/server-keystore.pem"
    chmod 0644 "$tmp"/*.crt
    chmod 0600 "$tmp"/*.key "$tmp/server-keystore.pem"
    rm -rf "$TLS_DIR"
    mv "$tmp" "$TLS_DIR"
}

tls_fingerprint() { openssl x509 -noout -fingerprint -sha256 -in "$TLS_SERVER_CERT" | cut -d= -f2; }

# ============================================================================================
# PostgreSQL 15 + wal2json
# ============================================================================================
pg_installed() { [ -z "$(missing_packages "${PG_PACKAGES[@]}")" ]; }

pg_running() {
    command -v pg_ctlcluster >/dev/null 2>&1 || return 1
    as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" status >/dev/null 2>&1
}

pg_log_file() {
    printf '/var/log/postgresql/postgresql-%s-%s.log\n' "$PG_VERSION" "$PG_CLUSTER"
}

# psql as the local superuser (peer auth over the unix socket)
pg_super() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" "$@"; }

pg_install() {
    apt_ensure "${PG_PACKAGES[@]}"
    if ! as_root test -f "$PG_CONF_DIR/postgresql.conf"; then
        log "creating cluster $PG_VERSION/$PG_CLUSTER"
        as_root pg_createcluster "$PG_VERSION" "$PG_CLUSTER" --port "$PG_PORT" >/dev/null
    fi
}

# writes the drop-in and the pg_hba block; prints "reload" when something changed
pg_configure() {
    local tmp changed=0
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Managed by outbox-cdc scripts/services.sh: logical decoding (wal2json) for the test suite.
listen_addresses = 'localhost'
port = $PG_PORT
wal_level = logical
max_replication_slots = 40
max_wal_senders = 40
max_slot_wal_keep_size = 2GB
# TLS with the local test CA's server certificate (a reload applies these)
ssl = on
ssl_cert_file = '$PG_TLS_DIR/server.crt'
ssl_key_file = '$PG_TLS_DIR/server.key'
EOF
    if ! as_root grep -Eq "^[[:space:]]*include_dir[[:space:]]*=[[:space:]]*'conf.d'" \
        "$PG_CONF_DIR/postgresql.conf"; then
        printf "\ninclude_dir = 'conf.d'\n" | as_root tee -a "$PG_CONF_DIR/postgresql.conf" >/dev/null
        changed=1
    fi
    as_root mkdir -p "$PG_CONF_DIR/conf.d"
    if install_if_changed "$tmp" "$PG_DROPIN"; then
        log "postgres: wrote $PG_DROPIN"
        changed=1
    fi

    as_root install -d -m 0700 -o postgres -g postgres "$PG_TLS_DIR"
    local f
    for f in server.crt server.key; do
        if ! as_root cmp -s "$TLS_DIR/$f" "$PG_TLS_DIR/$f"; then
            as_root install -m 0600 -o postgres -g postgres "$TLS_DIR/$f" "$PG_TLS_DIR/$f"
            log "postgres: installed $PG_TLS_DIR/$f"
            changed=1
        fi
    done

    # Password (scram) logins over 127.0.0.1 for every role. Two lines, because a *physical*
    # replication connection matches only the `replication` keyword, while a logical one
    # (replication=database) matches the database column like a normal connection. Put first so
    # that no earlier line (reject/peer/trust) wins. $PG_TLS_USER: TLS only (hostssl), from
    # 127.0.0.1 or ::1 (the name localhost may resolve to either); refused without TLS.
    {
        cat <<EOF
# BEGIN outbox-cdc (managed by scripts/services.sh)
hostssl    all          $PG_TLS_USER  127.0.0.1/32    scram-sha-256
hostssl    replication  $PG_TLS_USER  127.0.0.1/32    scram-sha-256
hostssl    all          $PG_TLS_USER  ::1/128         scram-sha-256
hostssl    replication  $PG_TLS_USER  ::1/128         scram-sha-256
hostnossl  all          $PG_TLS_USER  all             reject
hostnossl  replication  $PG_TLS_USER  all             reject
host       all          all         127.0.0.1/32    scram-sha-256
host       replication  all         127.0.0.1/32    scram-sha-256
# END outbox-cdc
EOF
        as_root awk '/^# BEGIN outbox-cdc/ { skip = 1 } !skip { print } /^# END outbox-cdc/ { skip = 0 }' "$PG_HBA"
    } >"$tmp"
    if ! as_root cmp -s "$tmp" "$PG_HBA"; then
        as_root install -m 0640 -o postgres -g postgres "$tmp" "$PG_HBA"
        log "postgres: wrote the outbox-cdc block at the top of $PG_HBA"
        changed=1
    fi
    rm -f "$tmp"
    [ "$changed" -eq 0 ] || echo reload
}

# poll until the server accepts connections on the unix socket
pg_wait_socket() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    until as_postgres pg_isready -q -p "$PG_PORT" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log_tail "$(pg_log_file)"
            die "postgres did not accept connections within ${READY_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

pg_start_server() {
    if ! pg_running; then
        without_extra_fds as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start \
            || { log_tail "$(pg_log_file)"; die "pg_ctlcluster $PG_VERSION $PG_CLUSTER start failed"; }
    fi
    pg_wait_socket
}

# restart if a setting that needs one differs from the running value
pg_apply_restart_settings() {
    local kv name want have
    for kv in "${PG_RESTART_SETTINGS[@]}"; do
        name=${kv%%=*}
        want=${kv#*=}
        have=$(pg_super -Atc "SHOW $name")
        if [ "$have" != "$want" ]; then
            log "postgres: $name is '$have', want '$want': restarting"
            without_extra_fds as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" restart -m fast \
                || { log_tail "$(pg_log_file)"; die "postgres restart failed"; }
            pg_wait_socket
            return 0
        fi
    done
    return 1
}

pg_setup_roles() {
    pg_super -d postgres <<'SQL'
SET client_min_messages = warning;
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox') THEN
    CREATE ROLE outbox LOGIN REPLICATION CREATEDB PASSWORD 'outbox';
  ELSIF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox'
                    AND rolcanlogin AND rolreplication AND rolcreatedb) THEN
    ALTER ROLE outbox LOGIN REPLICATION CREATEDB;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_admin') THEN
    CREATE ROLE outbox_admin LOGIN SUPERUSER PASSWORD 'outbox_admin';
  ELSIF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_admin'
                    AND rolcanlogin AND rolsuper) THEN
    ALTER ROLE outbox_admin LOGIN SUPERUSER;
  END IF;
END
$$;
SELECT 'CREATE DATABASE outbox_test OWNER outbox'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'outbox_test') \gexec
SQL
    pg_super -d postgres <<SQL
SET client_min_messages = warning;
SELECT 'CREATE ROLE $PG_TLS_USER LOGIN REPLICATION PASSWORD ''$PG_TLS_PASSWORD'' IN ROLE outbox'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_TLS_USER') \gexec
SQL
}

# a real query over TCP with the password, as $1 (outbox|outbox_admin)
pg_tcp_query() {
    local user=$1 sql=$2
    PGPASSWORD=$user PGCONNECT_TIMEOUT=5 psql -X -q -At -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PG_PORT" -U "$user" -d outbox_test -c "$sql"
}

pg_ready_check() {
    local user out
    for user in outbox outbox_admin; do
        out=$(pg_tcp_query "$user" 'SELECT 1' 2>&1) || true
        if [ "$out" != 1 ]; then
            log "postgres: 'SELECT 1' as $user over 127.0.0.1 failed: $out"
            return 1
        fi
    done
    # TLS with verify-full against the local CA, seen by the server in pg_stat_ssl
    out=$(PGPASSWORD=$PG_TLS_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -q -At -v ON_ERROR_STOP=1 \
        "host=localhost port=$PG_PORT user=$PG_TLS_USER dbname=outbox_test sslmode=verify-full sslrootcert=$TLS_CA" \
        -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' 2>&1) || true
    if [ "$out" != t ]; then
        log "postgres: 'SELECT ssl FROM pg_stat_ssl' as $PG_TLS_USER over verify-full TLS: $out"
        return 1
    fi
    # wal2json loads: creating a temporary slot (dropped when the session ends) loads the output
    # plugin, and needs the REPLICATION attribute. Slot creation waits for the transactions open
    # at that moment: when one stays open (another client's work), fall back to LOADing the
    # library as the superuser, which proves it is installed without waiting.
    out=$(pg_tcp_query outbox "SET statement_timeout = '5s';
        SELECT FROM pg_create_logical_replication_slot(
            'outbox_cdc_probe_' || pg_backend_pid(), 'wal2json', true);
        SELECT plugin FROM pg_replication_slots
        WHERE slot_name = 'outbox_cdc_probe_' || pg_backend_pid()" 2>&1 | tail -n 1) || true
    if [ "$out" = wal2json ]; then
        return 0
    fi
    if [[ $out == *"statement timeout"* ]] \
        && pg_tcp_query outbox_admin "LOAD 'wal2json'" >/dev/null 2>&1; then
        log "postgres: slot probe waited on an open transaction; LOAD 'wal2json' worked instead"
        return 0
    fi
    log "postgres: wal2json slot probe failed: $out"
    return 1
}

pg_ready() {
    if ! pg_ready_check; then
        # the passwords may have been changed by hand: set them back and try again
        log "postgres: resetting the passwords of outbox and outbox_admin"
        pg_super -d postgres -c "ALTER ROLE outbox PASSWORD 'outbox'" \
            -c "ALTER ROLE outbox_admin PASSWORD 'outbox_admin'" \
            -c "ALTER ROLE $PG_TLS_USER LOGIN REPLICATION PASSWORD '$PG_TLS_PASSWORD'" \
            -c "GRANT outbox TO $PG_TLS_USER" >/dev/null
        pg_ready_check || { log_tail "$(pg_log_file)"; die "postgres is running but not usable"; }
    fi
}

pg_up() {
    local t0 changed
    t0=$(now)
    UP_INSTALL=-
    if ! pg_installed || ! as_root test -f "$PG_CONF_DIR/postgresql.conf"; then
        pg_install
        UP_INSTALL=$(elapsed "$t0")
        log "postgres: installed in $UP_INSTALL s"
    fi
    tls_ensure
    changed=$(pg_configure)
    t0=$(now)
    if pg_running; then
        UP_HOW="was running"
        pg_wait_socket
        if [ "$changed" = reload ]; then
            as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload
            UP_HOW="was running, reloaded"
        fi
    else
        UP_HOW=started
        pg_start_server
    fi
    if pg_apply_restart_settings; then UP_HOW="restarted (settings changed)"; fi
    pg_setup_roles
    pg_ready
    UP_READY=$(elapsed "$t0")
}

pg_start() {
    local t0
    t0=$(now)
    pg_installed || die "postgres is not installed: run scripts/services.sh up"
    pg_start_server
    pg_ready
    log "postgres: started in $(elapsed "$t0") s"
}

pg_stop() {
    if pg_running; then
        as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop -m fast
        log "postgres: stopped"
    else
        log "postgres: not running"
    fi
}

pg_restart() {
    local t0
    t0=$(now)
    pg_installed || die "postgres is not installed: run scripts/services.sh up"
    if pg_running; then
        without_extra_fds as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" restart -m fast \
            || { log_tail "$(pg_log_file)"; die "postgres restart failed"; }
    fi
    pg_start_server
    pg_ready
    log "postgres: restarted in $(elapsed "$t0") s"
}

pg_status() {
    local state=stopped ver="" w2j
    pg_installed || { echo "postgres: not installed"; return 0; }
    if pg_running; then
        state="running on 127.0.0.1:$PG_PORT"
        if ver=$(pg_super -Atc 'SHOW server_version' 2>/dev/null); then
            ver="$ver, wal_level=$(pg_super -Atc 'SHOW wal_level' 2>/dev/null || true)"
        else
            state="running but not answering"
            ver=$(dpkg-query -W -f='${Version}' "postgresql-$PG_VERSION" 2>/dev/null || true)
        fi
    else
        ver=$(dpkg-query -W -f='${Version}' "postgresql-$PG_VERSION" 2>/dev/null || true)
    fi
    w2j=$(dpkg-query -W -f='${Version}' "postgresql-$PG_VERSION-wal2json" 2>/dev/null || true)
    echo "postgres: $state (PostgreSQL $ver; wal2json $w2j)"
}

# ============================================================================================
# Apache Kafka (KRaft, single node)
# ============================================================================================
java_major() {
    java -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit }'
}

kafka_jars_stamp() { sha256sum "$KAFKA_SRC/pom.xml" | cut -d' ' -f1; }
kafka_installed() {
    [ -f "$KAFKA_LIB/.stamp" ] && [ "$(cat "$KAFKA_LIB/.stamp")" = "$(kafka_jars_stamp)" ]
}

kafka_install() {
    if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 17 ]; then
        apt_ensure openjdk-17-jre-headless
    fi
    command -v mvn >/dev/null 2>&1 || apt_ensure maven
    local java_ver
    java_ver=$(java_major)
    [ "$java_ver" -ge 17 ] || die "Kafka 4 needs Java 17 or newer; 'java' is $java_ver"
    log "kafka: fetching the broker jars with maven (scripts/kafka/pom.xml -> $KAFKA_LIB)"
    mkdir -p "$KAFKA_HOME"
    local tmp="$KAFKA_HOME/lib.tmp.$$"
    rm -rf "$tmp"
    if ! mvn -B -q -f "$KAFKA_SRC/pom.xml" dependency:copy-dependencies \
        -Dkafka.lib.dir="$tmp" >"$KAFKA_HOME/mvn.log" 2>&1; then
        log_tail "$KAFKA_HOME/mvn.log"
        rm -rf "$tmp"
        die "maven could not fetch the Kafka jars (log: $KAFKA_HOME/mvn.log)"
    fi
    kafka_jars_stamp >"$tmp/.stamp"
    rm -rf "$KAFKA_LIB"
    mv "$tmp" "$KAFKA_LIB"
}

kafka_version() {
    local jar
    jar=$(find "$KAFKA_LIB" -maxdepth 1 -name 'kafka_2.13-*.jar' 2>/dev/null | head -n 1)
    [ -n "$jar" ] || return 0
    jar=${jar##*/kafka_2.13-}
    printf '%s\n' "${jar%.jar}"
}

kafka_java() {
    java -Xmx256m -Dlog4j2.configurationFile="$KAFKA_LOG4J" -cp "$KAFKA_LIB/*" "$@"
}

# pid of our broker if it runs (checked against /proc so a stale pid file is harmless)
kafka_pid() {
    local pid
    if [ -f "$KAFKA_PID" ]; then
        pid=$(cat "$KAFKA_PID")
        if [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" \
            | grep -qF "kafka.Kafka $KAFKA_CONF"; then
            printf '%s\n' "$pid"
            return 0
        fi
    fi
    # pid file lost: look for a broker started with exactly our config file
    pid=$(pgrep -f -- "kafka.Kafka $KAFKA_CONF" | head -n 1 || true)
    [ -n "$pid" ] || return 1
    printf '%s\n' "$pid" >"$KAFKA_PID"
    printf '%s\n' "$pid"
}
kafka_running() { kafka_pid >/dev/null; }

# renders the config; prints "changed" when the broker must be restarted with a fresh data dir
kafka_configure() {
    mkdir -p "$KAFKA_HOME"
    local tmp changed=""
    tmp=$(mktemp)
    sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
        -e "s|@FAULT_PORT@|$KAFKA_FAULT_PORT|g" -e "s|@FAULT_PROXY_PORT@|$KAFKA_FAULT_PROXY_PORT|g" \
        -e "s|@SASL_PORT@|$KAFKA_SASL_PORT|g" -e "s|@MTLS_PORT@|$KAFKA_MTLS_PORT|g" \
        -e "s|@SASL_USER@|$KAFKA_SASL_USER|g" -e "s|@SASL_PASSWORD@|$KAFKA_SASL_PASSWORD|g" \
        -e "s|@TLS_CA@|$TLS_CA|g" -e "s|@TLS_KEYSTORE@|$TLS_SERVER_PEM|g" \
        -e "s|@DATA_DIR@|$KAFKA_DATA|g" "$KAFKA_SRC/server.properties.in" >"$tmp"
    # the certificate's fingerprint: a new certificate changes the file, so the broker restarts
    printf '# server certificate sha256 %s\n' "$(tls_fingerprint)" >>"$tmp"
    if ! cmp -s "$tmp" "$KAFKA_CONF"; then
        [ ! -f "$KAFKA_CONF" ] || changed=changed
        mv "$tmp" "$KAFKA_CONF"
    else
        rm -f "$tmp"
    fi
    if ! cmp -s "$KAFKA_SRC/log4j2.properties" "$KAFKA_LOG4J"; then
        [ ! -f "$KAFKA_LOG4J" ] || changed=changed
        cp "$KAFKA_SRC/log4j2.properties" "$KAFKA_LOG4J"
    fi
    printf '%s\n' "$changed"
}

kafka_format() {
    [ -f "$KAFKA_DATA/meta.properties" ] && return 0
    local cluster_id
    rm -rf "$KAFKA_DATA"
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$KAFKA_LOG" | tail -n 1)
    [ -n "$cluster_id" ] || { log_tail "$KAFKA_LOG"; die "kafka: StorageTool random-uuid failed"; }
    log "kafka: formatting $KAFKA_DATA (cluster id $cluster_id)"
    # the SCRAM credentials of the SASL_SSL listener's user go into the metadata at format time
    kafka_java kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$KAFKA_CONF" \
        --add-scram "SCRAM-SHA-512=[name=$KAFKA_SASL_USER,password=$KAFKA_SASL_PASSWORD]" \
        >>"$KAFKA_LOG" 2>&1 || { log_tail "$KAFKA_LOG"; die "kafka: StorageTool format failed"; }
}

# One metadata request; status 0 when the broker answered and lists itself (not fenced).
# The last failure's output is kept in $KAFKA_PROBE_ERR for the timeout message.
KAFKA_PROBE_ERR=""
kafka_probe() {
    local py out
    if py=$(python_with_kafka); then
        out=$("$py" - "$KAFKA_BOOTSTRAP" 2>&1 <<'PY'
import sys
from kafka import KafkaAdminClient
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], client_id="outbox-cdc-services",
                         request_timeout_ms=5000, bootstrap_timeout_ms=5000)
try:
    brokers = admin.describe_cluster().get("brokers") or []
    if not [b for b in brokers if not b.get("is_fenced")]:
        sys.exit(f"no unfenced broker in the metadata: {brokers}")
finally:
    admin.close()
PY
        ) && return 0
    else
        # no kafka-python: the broker's own tool sends ApiVersions to each broker in the metadata
        out=$(kafka_java org.apache.kafka.tools.BrokerApiVersionsCommand \
            --bootstrap-server "$KAFKA_BOOTSTRAP" 2>&1) \
            && grep -q "^$KAFKA_BOOTSTRAP" <<<"$out" && return 0
    fi
    KAFKA_PROBE_ERR=$(tail -n 3 <<<"$out")
    return 1
}

# The SASL user's SCRAM credential, (re)written through the admin API on every start. The one
# written at format time (--add-scram) is lost when the broker restarts (seen with Kafka 4.3.1:
# describe_user_scram_credentials() empty after a plain stop and start), and the fault tests
# restart the broker.
kafka_ensure_scram() {
    local py out
    py=$(python_with_kafka) || die "kafka: no Python with kafka-python to set the SCRAM credential"
    if ! out=$("$py" - "$KAFKA_BOOTSTRAP" "$KAFKA_SASL_USER" "$KAFKA_SASL_PASSWORD" 2>&1 <<'PY'
import sys
from kafka import KafkaAdminClient
from kafka.admin import UserScramCredentialUpsertion
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], client_id="outbox-cdc-services",
                         request_timeout_ms=10000, bootstrap_timeout_ms=10000)
try:
    result = admin.alter_user_scram_credentials(
        [UserScramCredentialUpsertion(sys.argv[2], "SCRAM-SHA-512", sys.argv[3])])
    if any(result.values()):
        sys.exit(f"refused: {result}")
finally:
    admin.close()
PY
    ); then
        die "kafka: could not set the SCRAM credential of $KAFKA_SASL_USER: ${out##*$'\n'}"
    fi
}

kafka_wait_ready() {
    local pid=$1 deadline=$((SECONDS + KAFKA_READY_TIMEOUT))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log_tail "$KAFKA_LOG" 60
            die "kafka: the broker process $pid exited during startup (log: $KAFKA_LOG)"
        fi
        if port_open "$KAFKA_PORT" && port_open "$KAFKA_SASL_PORT" && port_open "$KAFKA_MTLS_PORT" \
            && kafka_probe; then
            kafka_ensure_scram
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log_tail "$KAFKA_LOG" 60
            [ -z "$KAFKA_PROBE_ERR" ] || log "kafka: last probe said: $KAFKA_PROBE_ERR"
            die "kafka: no metadata answer from $KAFKA_BOOTSTRAP within ${KAFKA_READY_TIMEOUT}s (log: $KAFKA_LOG)"
        fi
        sleep 0.2
    done
}

kafka_start_server() {
    local pid
    if pid=$(kafka_pid); then
        kafka_wait_ready "$pid"
        return 0
    fi
    local port
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_FAULT_PORT" "$KAFKA_SASL_PORT" \
        "$KAFKA_MTLS_PORT"; do
        if port_open "$port"; then die "kafka: port $port is taken by another process"; fi
    done
    kafka_format
    printf '===== %s starting broker =====\n' "$(date -Is)" >>"$KAFKA_LOG"
    rm -f "$KAFKA_PID"
    # setsid: own session, so a Ctrl-C or the end of the calling shell does not reach it.
    # The inner shell writes its own pid, then becomes the JVM (exec keeps the pid).
    # shellcheck disable=SC2016,SC2086  # $$ is for the inner shell; JAVA_OPTS is a word list
    (
        close_extra_fds
        exec nohup setsid bash -c 'echo $$ >"$0"; exec "$@"' "$KAFKA_PID" \
            java -Xms"$KAFKA_HEAP" -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
            ${OUTBOX_CDC_KAFKA_JAVA_OPTS:-} \
            -cp "$KAFKA_LIB/*" kafka.Kafka "$KAFKA_CONF"
    ) >>"$KAFKA_LOG" 2>&1 </dev/null &
    local deadline=$((SECONDS + 10))
    until [ -s "$KAFKA_PID" ] && pid=$(cat "$KAFKA_PID") && [ -n "$pid" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "kafka: broker did not start (log: $KAFKA_LOG)"
        sleep 0.05
    done
    kafka_wait_ready "$pid"
}

kafka_stop_server() {
    local pid deadline
    pid=$(kafka_pid) || { rm -f "$KAFKA_PID"; return 1; }
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + ${OUTBOX_CDC_KAFKA_STOP_TIMEOUT:-30}))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "kafka: broker $pid ignored SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
    done
    rm -f "$KAFKA_PID"
}

kafka_up() {
    local t0 changed
    t0=$(now)
    UP_INSTALL=-
    if ! kafka_installed; then
        kafka_install
        UP_INSTALL=$(elapsed "$t0")
        log "kafka: jars fetched in $UP_INSTALL s"
    fi
    tls_ensure
    changed=$(kafka_configure)
    t0=$(now)
    if [ "$changed" = changed ]; then
        log "kafka: configuration changed: restarting with a fresh data dir"
        kafka_stop_server || true
        rm -rf "$KAFKA_DATA"
    fi
    if kafka_running; then UP_HOW="was running"; else UP_HOW=started; fi
    kafka_start_server
    UP_READY=$(elapsed "$t0")
}

kafka_start() {
    local t0
    t0=$(now)
    kafka_installed || die "kafka is not installed: run scripts/services.sh up"
    kafka_start_server
    log "kafka: ready in $(elapsed "$t0") s"
}

kafka_stop() {
    local t0
    t0=$(now)
    if kafka_stop_server; then
        log "kafka: stopped in $(elapsed "$t0") s"
    else
        log "kafka: not running"
    fi
}

kafka_restart() {
    kafka_stop
    kafka_start
}

kafka_status() {
    local pid ver
    ver=$(kafka_version)
    if [ -z "$ver" ]; then
        echo "kafka: not installed (jars would go to $KAFKA_LIB)"
    elif pid=$(kafka_pid); then
        if port_open "$KAFKA_PORT" && kafka_probe; then
            echo "kafka: running on $KAFKA_BOOTSTRAP, pid $pid (Apache Kafka $ver, KRaft; log $KAFKA_LOG)"
        else
            echo "kafka: starting or unresponsive, pid $pid (Apache Kafka $ver; log $KAFKA_LOG)"
        fi
    else
        echo "kafka: stopped (Apache Kafka $ver; log $KAFKA_LOG)"
    fi
}

# ============================================================================================
# MariaDB
# ============================================================================================
mysql_client() { if command -v mariadb >/dev/null 2>&1; then echo mariadb; else echo mysql; fi; }
mysql_installed() { [ -z "$(missing_packages "${MYSQL_PACKAGES[@]}")" ]; }

# root over the unix socket (Debian: root@localhost authenticates with unix_socket)
mysql_root() { as_root "$(mysql_client)" --protocol=socket -uroot "$@"; }

mysql_running() { as_root mysqladmin --protocol=socket -uroot ping >/dev/null 2>&1; }

mysql_query_tcp() {
    MYSQL_PWD=outbox "$(mysql_client)" --protocol=tcp -h 127.0.0.1 -P "$MYSQL_PORT" -uoutbox \
        --connect-timeout=5 -N -B outbox_test -e "$1"
}

mysql_log_file() {
    local f
    for f in /var/log/mysql/error.log /var/lib/mysql/"$(hostname)".err; do
        if as_root test -f "$f"; then echo "$f"; return 0; fi
    done
    echo /var/log/mysql/error.log
}

mysql_configure() {
    local tmp changed=""
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Managed by outbox-cdc scripts/services.sh: the test server listens on loopback only.
[mysqld]
bind-address = 127.0.0.1
port = $MYSQL_PORT
EOF
    as_root mkdir -p "$(dirname "$MYSQL_DROPIN")"
    if install_if_changed "$tmp" "$MYSQL_DROPIN"; then
        log "mysql: wrote $MYSQL_DROPIN"
        changed=changed
    fi
    rm -f "$tmp"
    printf '%s\n' "$changed"
}

mysql_start_server() {
    if ! mysql_running; then
        if [ -x /etc/init.d/mariadb ]; then
            without_extra_fds as_root /etc/init.d/mariadb start >/dev/null \
                || { log_tail "$(mysql_log_file)"; die "mysql: /etc/init.d/mariadb start failed"; }
        else
            as_root install -d -o mysql -g mysql /run/mysqld
            without_extra_fds as_root bash -c 'nohup setsid mysqld_safe >/dev/null 2>&1 </dev/null &'
        fi
    fi
    local deadline=$((SECONDS + READY_TIMEOUT))
    until mysql_running; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log_tail "$(mysql_log_file)"
            die "mysql: the server did not answer within ${READY_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

mysql_stop_server() {
    mysql_running || return 1
    if [ -x /etc/init.d/mariadb ]; then
        as_root /etc/init.d/mariadb stop >/dev/null
    else
        as_root mysqladmin --protocol=socket -uroot shutdown
    fi
}

mysql_setup_user() {
    mysql_root <<SQL
CREATE DATABASE IF NOT EXISTS outbox_test;
CREATE USER IF NOT EXISTS 'outbox'@'127.0.0.1' IDENTIFIED BY 'outbox';
CREATE USER IF NOT EXISTS 'outbox'@'localhost' IDENTIFIED BY 'outbox';
GRANT ALL PRIVILEGES ON outbox_test.* TO 'outbox'@'127.0.0.1';
GRANT ALL PRIVILEGES ON outbox_test.* TO 'outbox'@'localhost';
SQL
}

mysql_ready() {
    local out
    out=$(mysql_query_tcp 'SELECT 1' 2>&1) || true
    [ "$out" != 1 ] || return 0
    log "mysql: 'SELECT 1' as outbox over 127.0.0.1 failed ($out): resetting the user"
    mysql_root -e "ALTER USER 'outbox'@'127.0.0.1' IDENTIFIED BY 'outbox';
                   ALTER USER 'outbox'@'localhost' IDENTIFIED BY 'outbox';"
    out=$(mysql_query_tcp 'SELECT 1' 2>&1) || true
    if [ "$out" != 1 ]; then
        log_tail "$(mysql_log_file)"
        die "mysql: 'SELECT 1' as outbox failed: $out"
    fi
}

mysql_up() {
    local t0 changed
    t0=$(now)
    UP_INSTALL=-
    if ! mysql_installed; then
        apt_ensure "${MYSQL_PACKAGES[@]}"
        UP_INSTALL=$(elapsed "$t0")
        log "mysql: installed in $UP_INSTALL s"
    fi
    changed=$(mysql_configure)
    t0=$(now)
    if mysql_running; then UP_HOW="was running"; else UP_HOW=started; fi
    if [ "$changed" = changed ] && mysql_running; then
        log "mysql: configuration changed: restarting"
        mysql_stop_server || true
        UP_HOW="restarted (configuration changed)"
    fi
    mysql_start_server
    mysql_setup_user
    mysql_ready
    UP_READY=$(elapsed "$t0")
}

mysql_start() {
    local t0
    t0=$(now)
    mysql_installed || die "mysql is not installed: run scripts/services.sh up"
    mysql_start_server
    mysql_ready
    log "mysql: ready in $(elapsed "$t0") s"
}

mysql_stop() {
    if mysql_stop_server; then log "mysql: stopped"; else log "mysql: not running"; fi
}

mysql_restart() {
    mysql_stop
    mysql_start
}

mysql_status() {
    mysql_installed || { echo "mysql: not installed"; return 0; }
    if mysql_running; then
        echo "mysql: running on 127.0.0.1:$MYSQL_PORT ($(mysql_root -N -B -e 'SELECT CONCAT("MariaDB ", VERSION())'))"
    else
        echo "mysql: stopped ($(dpkg-query -W -f='MariaDB ${Version}' mariadb-server 2>/dev/null || true))"
    fi
}

# ============================================================================================
# commands
# ============================================================================================
write_env_file() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by scripts/services.sh up: source it (. ./.services.env) before running pytest.
export OUTBOX_CDC_TEST_POSTGRES_URL=$PG_URL
export OUTBOX_CDC_TEST_POSTGRES_ADMIN_URL=$PG_ADMIN_URL
export OUTBOX_CDC_TEST_KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP
export OUTBOX_CDC_TEST_KAFKA_FAULT_LISTENER=127.0.0.1:$KAFKA_FAULT_PORT
export OUTBOX_CDC_TEST_KAFKA_FAULT_ADVERTISED=127.0.0.1:$KAFKA_FAULT_PROXY_PORT
export OUTBOX_CDC_TEST_MYSQL_URL=$MYSQL_URL
export OUTBOX_CDC_TEST_SERVICES_SCRIPT=$SCRIPT_PATH
export OUTBOX_CDC_TEST_CA_FILE=$TLS_CA
export OUTBOX_CDC_TEST_OTHER_CA_FILE=$TLS_OTHER_CA
export OUTBOX_CDC_TEST_CLIENT_CERT_FILE=$TLS_CLIENT_CERT
export OUTBOX_CDC_TEST_CLIENT_KEY_FILE=$TLS_CLIENT_KEY
export OUTBOX_CDC_TEST_POSTGRES_TLS_URL='$PG_TLS_URL'
export OUTBOX_CDC_TEST_KAFKA_SASL_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_SASL_PORT
export OUTBOX_CDC_TEST_KAFKA_SASL_USERNAME=$KAFKA_SASL_USER
export OUTBOX_CDC_TEST_KAFKA_SASL_PASSWORD=$KAFKA_SASL_PASSWORD
export OUTBOX_CDC_TEST_KAFKA_MTLS_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_MTLS_PORT
EOF
    if cmp -s "$tmp" "$ENV_FILE"; then
        rm -f "$tmp"
    else
        chmod 0644 "$tmp"
        mv "$tmp" "$ENV_FILE"
        log "wrote $ENV_FILE"
    fi
}

# function prefix of a service
fn() { if [ "$1" = postgres ]; then echo pg; else echo "$1"; fi; }

is_running() {
    case $1 in
        postgres) pg_running ;;
        kafka) kafka_running ;;
        mysql) mysql_running ;;
    esac
}

cmd_up() {
    local t0 name summary=()
    t0=$(now)
    mkdir -p "$CACHE_DIR"
    for name in "${SERVICES[@]}"; do
        UP_INSTALL=- UP_READY=- UP_HOW=""
        if is_running "$name"; then
            "$(fn "$name")_up"
        else
            "$(fn "$name")_up"
            state_add "$name"
        fi
        summary+=("$(printf '  %-9s install %6s s   ready %6s s   (%s)' \
            "$name" "$UP_INSTALL" "$UP_READY" "$UP_HOW")")
        log "$name: ready in $UP_READY s ($UP_HOW)"
    done
    write_env_file
    log "all services ready in $(elapsed "$t0") s:"
    printf '%s\n' "${summary[@]}" >&2
    log "now: . ./.services.env"
}

cmd_down() {
    local name i
    if [ ! -s "$STATE_FILE" ]; then
        log "down: nothing was started by 'up' ($STATE_FILE is empty)"
        return 0
    fi
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        name=${SERVICES[$i]}
        state_has "$name" || continue
        "$(fn "$name")_stop"
        state_remove "$name"
    done
}

cmd_status() {
    pg_status
    kafka_status
    mysql_status
    if [ -s "$STATE_FILE" ]; then
        echo "started by 'up' (stopped by 'down'): $(paste -sd' ' "$STATE_FILE")"
    fi
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

# One command at a time (e.g. a test restarting postgres while another shell runs `up`). The lock
# descriptor is closed for daemons by without_extra_fds, so they never hold it.
take_lock() {
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/services.lock"
    if command -v flock >/dev/null 2>&1 && ! flock -w 600 9; then
        die "another scripts/services.sh held $CACHE_DIR/services.lock for 10 minutes"
    fi
}

main() {
    [ $# -ge 1 ] || usage
    local cmd=$1
    shift
    [ "$cmd" = status ] || take_lock
    case $cmd in
        up | down | status)
            [ $# -eq 0 ] || usage
            "cmd_$cmd"
            ;;
        start | stop | restart)
            [ $# -eq 1 ] || usage
            case $1 in
                postgres | kafka | mysql) "$(fn "$1")_$cmd" ;;
                *) die "unknown service '$1' (postgres|kafka|mysql)" ;;
            esac
            ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
