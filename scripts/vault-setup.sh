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
# Vault checks every login with a TokenReview, authenticated with a reviewer token. Vault
# outside the cluster has no token of its own: without TOKEN_REVIEWER_JWT it would send
# the daemon's token, whose audience is `vault`, and the API server refuses every login
# ("token audiences [\"vault\"] is invalid for the target audiences"). So with
# KUBERNETES_HOST the script wants either TOKEN_REVIEWER_JWT (a file holding the token of
# a ServiceAccount bound to ClusterRole system:auth-delegator: the chart's
# vault.tokenReviewer, or one made by hand, see docs/vault.md), or VAULT_IN_CLUSTER=1
# (Vault runs in the cluster and reviews with its own ServiceAccount's token, given the
# same binding). Before writing the config it checks, with curl, that the reviewer token
# may create TokenReviews at KUBERNETES_HOST (CHECK_REVIEWER=0 skips that, e.g. when the
# API server is reachable from Vault but not from here).
#
# Environment (defaults in brackets):
#   ROOT_MOUNT [pki-root]  KONG_MOUNT [pki-kong]  KV_MOUNT [secret]
#   AUTH_MOUNT [kubernetes]  AUTH_ROLE [ca-daemon]  POLICY [ca-daemon]
#   SA_NAMESPACE [ca-daemon]  SA_NAME [ca-daemon]  AUDIENCE [vault]  TOKEN_TTL [1h]
#   KUBERNETES_HOST (e.g. https://api.example.com:6443; unset: keep the auth config)
#   KUBERNETES_CA_CERT (file: the CA of the API server's serving certificate)
#   TOKEN_REVIEWER_JWT (file: the reviewer's token)  VAULT_IN_CLUSTER [0]
#   CHECK_REVIEWER [1]
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

die() { echo "vault-setup: $*" >&2; exit 1; }

# Refuse a Kubernetes auth config that cannot work before anything is written.
if [[ -n ${KUBERNETES_HOST:-} ]]; then
  if [[ -n ${TOKEN_REVIEWER_JWT:-} ]]; then
    [[ -s $TOKEN_REVIEWER_JWT ]] || die "TOKEN_REVIEWER_JWT=$TOKEN_REVIEWER_JWT: no such file, or empty"
  elif [[ ${VAULT_IN_CLUSTER:-0} != 1 ]]; then
    die "KUBERNETES_HOST without a token reviewer: Vault outside the cluster would review" \
      "each login with the daemon's own token (audience $AUDIENCE), which the API server" \
      "refuses. Set TOKEN_REVIEWER_JWT to a file holding the token of a ServiceAccount" \
      "bound to ClusterRole system:auth-delegator (docs/vault.md), or VAULT_IN_CLUSTER=1" \
      "when Vault runs in the cluster with such a ServiceAccount of its own."
  fi
  if [[ -n ${KUBERNETES_CA_CERT:-} && ! -s $KUBERNETES_CA_CERT ]]; then
    die "KUBERNETES_CA_CERT=$KUBERNETES_CA_CERT: no such file, or empty"
  fi
fi

# The reviewer token may create TokenReviews: 201 for a review of a token that means
# nothing (its answer is "not authenticated"); 401 is a token the API server does not
# accept (expired, deleted Secret, another cluster), 403 one without system:auth-delegator.
check_reviewer() {
  [[ ${DRY_RUN:-0} == 1 || ${CHECK_REVIEWER:-1} != 1 || -z ${TOKEN_REVIEWER_JWT:-} ]] && return 0
  if ! command -v curl >/dev/null; then
    echo "vault-setup: curl not found: the reviewer token is not checked" >&2
    return 0
  fi
  local status
  # The token goes to curl on stdin (a header file), never on its command line.
  status=$(printf 'Authorization: Bearer %s\n' "$(tr -d '[:space:]' <"$TOKEN_REVIEWER_JWT")" |
    curl --silent --show-error --output /dev/null --write-out '%{http_code}' \
      --max-time 15 ${KUBERNETES_CA_CERT:+--cacert "$KUBERNETES_CA_CERT"} \
      --header @- --header 'Content-Type: application/json' --request POST \
      --data '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{"token":"not-a-token"}}' \
      "${KUBERNETES_HOST%/}/apis/authentication.k8s.io/v1/tokenreviews") ||
    die "cannot reach $KUBERNETES_HOST to check the reviewer token (CHECK_REVIEWER=0 skips the check)"
  case $status in
    201) ;;
    401) die "the API server at $KUBERNETES_HOST does not accept TOKEN_REVIEWER_JWT (401: expired, revoked, or from another cluster)" ;;
    403) die "TOKEN_REVIEWER_JWT may not create TokenReviews (403): bind its ServiceAccount to ClusterRole system:auth-delegator" ;;
    *) die "checking TOKEN_REVIEWER_JWT at $KUBERNETES_HOST: HTTP $status" ;;
  esac
}
check_reviewer

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
  # The whole config each time: a field left out is reset (a reviewer from an earlier
  # run does not linger when VAULT_IN_CLUSTER=1 is asked for now).
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
