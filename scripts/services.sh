#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on loopback; start any that is down.
# Exits non-zero naming the service that could not be started.
set -u

wait_for() {  # name, seconds, probe command...
  local name=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
      echo "services: $name did not answer within ${seconds}s" >&2
      return 1
    fi
    sleep 1
  done
}

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
rabbit_up() { rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; }

failed=0
if ! pg_up; then
  echo "services: starting PostgreSQL"
  if ! command -v pg_ctlcluster >/dev/null; then
    echo "services: PostgreSQL is down and pg_ctlcluster is not installed" >&2; failed=1
  else
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    wait_for PostgreSQL 60 pg_up || failed=1
  fi
fi
if ! redis_up; then
  echo "services: starting Redis"
  if ! command -v redis-server >/dev/null; then
    echo "services: Redis is down and redis-server is not installed" >&2; failed=1
  else
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis 30 redis_up || failed=1
  fi
fi
if ! rabbit_up; then
  echo "services: starting RabbitMQ"
  if ! command -v rabbitmq-server >/dev/null; then
    echo "services: RabbitMQ is down and rabbitmq-server is not installed" >&2; failed=1
  else
    rabbitmq-server -detached
    wait_for RabbitMQ 120 rabbit_up || failed=1
  fi
fi
exit $failed
