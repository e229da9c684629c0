#!/usr/bin/env bash
# The real llama-server, started late when the model path contains "slow": makes a load
# take MMD_TEST_LOAD_DELAY seconds (default 3) so tests can act while a model loads, or
# hit the load timeout. Everything else is passed through unchanged.
case "$*" in
  *slow*) sleep "${MMD_TEST_LOAD_DELAY:-3}" ;;
esac
exec "$MMD_TEST_REAL_LLAMA_SERVER" "$@"
