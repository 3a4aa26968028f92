#!/usr/bin/env bash
# One-time Vault/OpenBao set-up for ca-daemon, run by an administrator (docs/vault.md).
#
# Creates what the daemon would otherwise create itself with anchor.vault.create_if_missing
# (the same mounts and the same kong-client role parameters as ca_daemon/anchor/vault/pki.py),
# the least-privilege policy (policies/vault-policy.hcl) and a Kubernetes auth role bound
# to the chart's ServiceAccount, with audience `vault` (the chart's vault.audience).
# Afterwards set anchor.vault.create_if_missing=false in the chart's values.
#
# Needs: the `vault` (or `bao`: VAULT_CLI=bao) CLI logged in as an administrator
# (VAULT_ADDR, VAULT_TOKEN), and, for the Kubernetes auth method, the API server's address
# and CA as Vault must reach them.
#
# Environment (defaults in brackets):
#   ROOT_MOUNT [pki-root]  KONG_MOUNT [pki-kong]  KV_MOUNT [secret]
#   AUTH_MOUNT [kubernetes]  AUTH_ROLE [ca-daemon]  POLICY [ca-daemon]
#   SA_NAMESPACE [ca-daemon]  SA_NAME [ca-daemon]  AUDIENCE [vault]  TOKEN_TTL [1h]
#   TOKEN_REVIEWER_JWT [unset: Vault reviews logins with its own ServiceAccount token]
#   KUBERNETES_HOST (e.g. https://kubernetes.default.svc:443; unset: keep the auth config)
#   KUBERNETES_CA_CERT (file; with KUBERNETES_HOST)
#   DRY_RUN=1  print the commands instead of running them
set -euo pipefail

VAULT_CLI=${VAULT_CLI:-vault}
ROOT_MOUNT=${ROOT_MOUNT:-pki-root}
KONG_MOUNT=${KONG_MOUNT:-pki-kong}
KV_MOUNT=${KV_MOUNT:-secret}
AUTH_MOUNT=${AUTH_MOUNT:-kubernetes}
AUTH_ROLE=${AUTH_ROLE:-ca-daemon}
POLICY=${POLICY:-ca-daemon}
SA_NAMESPACE=${SA_NAMESPACE:-ca-daemon}
SA_NAME=${SA_NAME:-ca-daemon}
AUDIENCE=${AUDIENCE:-vault}
TOKEN_TTL=${TOKEN_TTL:-1h}
MAX_TTL=876000h   # MOUNT_MAX_TTL in ca_daemon/anchor/vault/pki.py
HERE=$(cd "$(dirname "$0")" && pwd)
POLICY_FILE=${POLICY_FILE:-$HERE/../policies/vault-policy.hcl}

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

mounted() {  # secrets-engine path, e.g. pki-root/
  [[ ${DRY_RUN:-0} == 1 ]] && return 1
  # Not a pipe into grep -q: with pipefail, grep leaving early fails the pipeline.
  grep -q "\"$1/\"" <<<"$("$VAULT_CLI" secrets list -format=json)"
}

for mount in "$ROOT_MOUNT" "$KONG_MOUNT"; do
  mounted "$mount" || run "$VAULT_CLI" secrets enable -path="$mount" pki
  run "$VAULT_CLI" secrets tune -max-lease-ttl="$MAX_TTL" "$mount"
done
mounted "$KV_MOUNT" || run "$VAULT_CLI" secrets enable -path="$KV_MOUNT" -version=2 kv

# Kong upstream client certificates: clientAuth leaves signed from CSRs, nothing stored.
run "$VAULT_CLI" write "$KONG_MOUNT/roles/kong-client" \
  allow_any_name=true enforce_hostnames=false allow_ip_sans=false \
  allowed_uri_sans='*' server_flag=false client_flag=true code_signing_flag=false \
  email_protection_flag=false key_type=any key_usage=DigitalSignature \
  basic_constraints_valid_for_non_ca=true use_csr_common_name=false use_csr_sans=false \
  no_store=true generate_lease=false max_ttl="$MAX_TTL"

# The policy names the default mounts; rename them in the file if you renamed them here.
run "$VAULT_CLI" policy write "$POLICY" "$POLICY_FILE"

if [[ ${DRY_RUN:-0} == 1 ]] || ! grep -q "\"$AUTH_MOUNT/\"" <<<"$("$VAULT_CLI" auth list -format=json)"; then
  run "$VAULT_CLI" auth enable -path="$AUTH_MOUNT" kubernetes
fi
if [[ -n ${KUBERNETES_HOST:-} ]]; then
  # Vault checks each login with a TokenReview. Outside the cluster it needs a reviewer
  # token (TOKEN_REVIEWER_JWT: a file holding the token of a ServiceAccount bound to
  # system:auth-delegator); inside, it may use its own ServiceAccount's, given the same
  # binding (docs/vault.md).
  run "$VAULT_CLI" write "auth/$AUTH_MOUNT/config" kubernetes_host="$KUBERNETES_HOST" \
    ${KUBERNETES_CA_CERT:+kubernetes_ca_cert=@"$KUBERNETES_CA_CERT"} \
    ${TOKEN_REVIEWER_JWT:+token_reviewer_jwt=@"$TOKEN_REVIEWER_JWT"}
fi
# Only the chart's ServiceAccount, only tokens minted for audience `vault`.
run "$VAULT_CLI" write "auth/$AUTH_MOUNT/role/$AUTH_ROLE" \
  bound_service_account_names="$SA_NAME" \
  bound_service_account_namespaces="$SA_NAMESPACE" \
  audience="$AUDIENCE" \
  token_policies="$POLICY" token_ttl="$TOKEN_TTL" token_max_ttl="$TOKEN_TTL"

echo "done: set config.anchor.vault.auth.role=$AUTH_ROLE, auth.mount=$AUTH_MOUNT and" \
  "anchor.vault.create_if_missing=false in the chart's values" >&2
