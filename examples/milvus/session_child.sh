#!/bin/sh
# A stand-in for a Milvus 2.6 coordinator's own etcd session, to run under `ha run`:
# like MixCoord, it keeps a key bound to a lease of its own (TTL = common.session.ttl)
# and, when it starts, waits until its predecessor's key is gone before it serves.
# After a crash that key lives until its lease runs out, so the next coordinator
# serves max(ha TTL, session TTL) after the crash, however short ha's TTL is
# (docs/operations.md, "Milvus 2.6"; measured by tests/milvus_session.rs).
#
#   ha run --backend etcd://127.0.0.1:2379 --role mixcoord --ttl 2s -- \
#       sh examples/milvus/session_child.sh 127.0.0.1:2379 by-dev/session/mixcoord 30 ready.log
#
# Arguments: etcd endpoint, session key, session TTL (s), a file to append
# "ready <server id> <token> <unix ns>" to once it serves. Needs etcdctl (v3 API).
set -eu
endpoint=$1 key=$2 ttl=$3 log=$4
etcd() { ETCDCTL_API=3 etcdctl --endpoints="$endpoint" --command-timeout=2s "$@"; }

lease=$(etcd lease grant "$ttl" | awk '{print $2}')
# Renews every TTL/3 until this process group is stopped (ha stops the whole group).
etcd lease keep-alive "$lease" >/dev/null 2>&1 &
# Take the key once the predecessor's is gone (Milvus watches it; polling costs <= 0.1 s).
while :; do
  taken=$(printf 'create("%s") = "0"\n\nput --lease=%s %s %s\n\n\n' \
    "$key" "$lease" "$key" "${HA_SERVER_ID:-0}" | etcd txn)
  case $taken in SUCCESS*) break ;; esac
  sleep 0.1
done
echo "ready ${HA_SERVER_ID:-0} ${HA_FENCING_TOKEN:-0} $(date +%s%N)" >>"$log"
while :; do sleep 1; done
