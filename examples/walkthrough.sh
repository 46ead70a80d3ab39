#!/usr/bin/env bash
# The membership walk-through: an alliance operator founds an alliance, two
# universities join, each certifies a node, and a revocation takes effect.
# Every step is the `alliance` command a person would type; they run in a
# temporary directory that is removed at the end.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet -p alliance-node --manifest-path "$here/Cargo.toml"
alliance="$here/target/release/alliance"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

step() { printf '\n\033[1m## %s\033[0m\n' "$*"; }
run() { printf '$ alliance %s\n' "$*"; "$alliance" "$@"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

step "Operator: found the alliance (root key + signed charter)"
run charter new --name "Alliance of Example Universities" --out-dir operator \
    --bootstrap /dns4/boot.alliance.example/tcp/4001
run charter show --charter operator/charter.alliance

for uni in north south; do
  step "Lab admin at $uni: create the institution key, send the public half to the operator"
  key=$("$alliance" --json member new --out-dir "$uni" | field public_key)
  echo "$uni institution key: $key"

  step "Operator: admit $uni"
  run charter admit --institution "University of ${uni^}" --key "$key" --roles work,submit --days 365 \
      --root-key operator/root.key --charter operator/charter.alliance --out "$uni/institution.cert"

  step "Lab admin at $uni: set up a node and certify it"
  peer=$("$alliance" --json init --data-dir "$uni/node" | field peer_id)
  echo "node PeerId: $peer"
  run member issue --node "$peer" --roles work --days 30 \
      --institution-key "$uni/institution.key" --institution-cert "$uni/institution.cert" \
      --charter operator/charter.alliance --out "$uni/node/node.chain"
  cp operator/charter.alliance "$uni/node/"
  run node check --data-dir "$uni/node"
done

step "Anyone: verify the south node's chain against the charter"
run cert verify south/node/node.chain --charter operator/charter.alliance --role work

step "A chain from another alliance is refused"
"$alliance" charter new --name "Some Other Alliance" --out-dir other >/dev/null
if run cert verify south/node/node.chain --charter other/charter.alliance; then exit 1; fi

step "North revokes its node (laptop stolen); the chain no longer verifies"
north_peer=$("$alliance" --json cert verify north/node/node.chain --charter operator/charter.alliance \
    | python3 -c "import json,sys; print([v for v in json.load(sys.stdin) if v['kind']=='node'][0]['peer_id'])")
run member revoke --key "$north_peer" --reason "laptop stolen" --signing-key north/institution.key \
    --charter operator/charter.alliance --list north/revocations.alliance
if run cert verify north/node/node.chain north/revocations.alliance --charter operator/charter.alliance; then exit 1; fi

step "The GPUs this machine would offer"
run gpus --local

printf '\nwalk-through complete\n'
