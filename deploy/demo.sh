#!/bin/sh
# The demo: submit every workflow in examples/, wait for each, print its result.
# Run with `docker compose run --rm demo`. A workflow whose file name starts with "fail-" is
# expected to fail (it shows failure handling); any other outcome than expected exits non-zero.
set -u
status=0
for file in examples/*.yaml; do
  name="$(basename "$file" .yaml)"
  echo "=== $name"
  dagsmith submit "$file" --wait
  code=$?
  case "$name" in
    fail-*) [ "$code" -ne 0 ] || { echo "demo: $name was expected to fail" >&2; status=1; } ;;
    *) [ "$code" -eq 0 ] || { echo "demo: $name did not succeed" >&2; status=1; } ;;
  esac
done
exit "$status"
