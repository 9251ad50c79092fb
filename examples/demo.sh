#!/usr/bin/env bash
# drover's first-run demo: builds drover, makes a scratch Nix store in a temporary
# directory, adds the example derivations of examples/*.drv.json to it (drover
# computes their output paths and .drv paths exactly as Nix does), builds the graph
# with `drover realise` and shows what the store then knows. Needs only a Rust
# toolchain and /bin/sh; no Nix installation is touched.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet -p drover-cli --bin drover
drover() { "$PWD/target/debug/drover" "$@"; }

root=$(mktemp -d -t drover-demo-XXXXXX)
export NIX_STORE_DIR=$root/store NIX_STATE_DIR=$root/var/nix
export NIX_LOG_DIR=$root/var/log/nix NIX_CONF_DIR=$root/etc
mkdir -p "$NIX_CONF_DIR"
# No sandbox: a sandboxed build needs a static /bin/sh to bind into the chroot
# (Nix's is busybox, 'sandbox-paths = /bin/sh=/bin/busybox'), which a fresh machine
# may not have; builds run as the caller (no build users).
printf 'sandbox = false\nbuild-users-group =\nsubstituters =\n' >"$NIX_CONF_DIR/nix.conf"

say() { printf '\n\033[1m$ %s\033[0m\n' "$*" >&2; }
out_of() { drover derivation show "$1" | sed -n 's/^ *"path": "\([^"]*\)".*/\1/p' | tail -n 1; }

echo "scratch store: $NIX_STORE_DIR" >&2

say drover derivation add examples/hello.drv.json
hello=$(drover derivation add examples/hello.drv.json)
echo "$hello"

say drover derivation add examples/fetched.drv.json
fetched=$(drover derivation add examples/fetched.drv.json)
echo "$fetched"

# greeting depends on both: fill in their paths, which depend on the store dir.
say drover derivation add - '<' examples/greeting.drv.json
greeting=$(sed -e "s|@HELLO_DRV@|$hello|; s|@FETCHED_DRV@|$fetched|" \
    -e "s|@HELLO_OUT@|$(out_of "$hello")|g; s|@FETCHED_OUT@|$(out_of "$fetched")|g" \
    examples/greeting.drv.json | drover derivation add -)
echo "$greeting"

say drover derivation show "$greeting"
drover derivation show "$greeting"

say drover realise "$greeting"
outputs=$(drover realise --plain "$greeting")
echo "$outputs"

out=$(echo "$outputs" | grep -v -- '-doc$')
say cat "$out"
cat "$out"

say drover log "$greeting"
drover log "$greeting"

say drover path-info --sigs --closure-size --human-readable --recursive "$out"
drover path-info --sigs --closure-size --human-readable --recursive "$out"

say drover path-info --json "$out"
drover path-info --json "$out"
echo
