# Starts a throwaway etcd server for the tests (being written).
# shellcheck shell=bash

start_etcd() {
  log "etcd: not set up yet"
}
