# Starts a throwaway zookeeper server for the tests (being written).
# shellcheck shell=bash

start_zookeeper() {
  log "zookeeper: not set up yet"
}
