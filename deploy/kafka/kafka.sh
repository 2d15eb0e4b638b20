#!/usr/bin/env bash
# Local Apache Kafka 4.x (KRaft, one node acting as broker and controller) on 127.0.0.1.
#
#   deploy/kafka/kafka.sh up      resolve jars (once), format storage (once), start, wait until ready
#   deploy/kafka/kafka.sh down    stop the broker started from this data directory
#   deploy/kafka/kafka.sh status  exit 0 when the broker answers on its port
#
# Environment:
#   KAFKA_PORT             client listener port            (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port           (default KAFKA_PORT+1)
#   KAFKA_HOME_DIR         jars, data, logs and PID file   (default <repo>/.cache/kafka)
#   KAFKA_READY_TIMEOUT    seconds to wait for readiness   (default 90)
#   KAFKA_HEAP_OPTS        JVM heap                        (default -Xms256m -Xmx768m)
#
# "up" reuses a broker that already answers on KAFKA_PORT, so tests, `make demo` and CI can all call it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-$((port + 1))}"
home="${KAFKA_HOME_DIR:-$repo/.cache/kafka}"
lib="$home/lib"
data="$home/data-$port"
log="$home/broker-$port.log"
pidfile="$home/broker-$port.pid"
ready_timeout="${KAFKA_READY_TIMEOUT:-90}"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

resolve_jars() {
  if [ -f "$lib/.resolved" ]; then return; fi
  command -v mvn >/dev/null || { echo "kafka.sh: mvn not found; install Maven (apt-get install maven)" >&2; exit 1; }
  command -v java >/dev/null || { echo "kafka.sh: java not found; install a JDK 17+" >&2; exit 1; }
  echo "kafka.sh: resolving Kafka jars from Maven Central into $lib" >&2
  mkdir -p "$lib"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies -DoutputDirectory="$lib" >&2
  touch "$lib/.resolved"
}

write_config() {
  mkdir -p "$data"
  cat > "$home/server-$port.properties" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT${KAFKA_EXTRA_PROTOCOL_MAP:-}
inter.broker.listener.name=PLAINTEXT
log.dirs=$data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.retention.hours=24
message.max.bytes=2097152
CONF
  if [ -n "${KAFKA_EXTRA_CONFIG:-}" ]; then printf '%s\n' "$KAFKA_EXTRA_CONFIG" >> "$home/server-$port.properties"; fi
}

# shellcheck disable=SC2206  # the JVM options are meant to split into words
java_args=(${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m} ${KAFKA_JVM_OPTS:-}
  -Dlog4j2.configurationFile="$here/log4j2.properties" -cp "$lib/*")

up() {
  if port_open "$port"; then echo "kafka.sh: reusing the broker already on 127.0.0.1:$port"; return; fi
  resolve_jars
  write_config
  if [ ! -f "$data/meta.properties" ]; then
    java "${java_args[@]}" kafka.tools.StorageTool format -t "$(java "${java_args[@]}" kafka.tools.StorageTool random-uuid)" \
      -c "$home/server-$port.properties" ${KAFKA_FORMAT_ARGS:-} >/dev/null
  fi
  nohup java "${java_args[@]}" kafka.Kafka "$home/server-$port.properties" > "$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  for _ in $(seq "$ready_timeout"); do
    if grep -q "Kafka Server started" "$log" 2>/dev/null && port_open "$port"; then
      echo "kafka.sh: broker ready on 127.0.0.1:$port (pid $(cat "$pidfile"), log $log)"; return
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "kafka.sh: broker exited; see $log" >&2; tail -20 "$log" >&2; exit 1; fi
    sleep 1
  done
  echo "kafka.sh: broker not ready after ${ready_timeout}s; see $log" >&2; exit 1
}

down() {
  [ -f "$pidfile" ] || { echo "kafka.sh: no PID file for port $port"; return; }
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "kafka.sh: broker on port $port stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) port_open "$port" ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
