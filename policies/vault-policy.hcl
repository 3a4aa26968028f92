# ca-daemon's Vault/OpenBao policy: only what the daemon does, on its own mounts.
#
# Paths use the default names (anchor.vault.root_mount=pki-root, kong_mount=pki-kong,
# kv_mount=secret, state_path=ca-daemon/state); rename them here if you rename them there.
# With this policy set anchor.vault.create_if_missing=false and let an administrator
# create the mounts and the kong-client role once (README: "Vault set-up").
#
# Deliberately absent: sys/*, any */exported or */sign-verbatim or */sign-self-issued
# path, key import/export, revocation on the root mount, tidy, and every other KV path.

# Health check: the daemon looks up its own token (also: its TTL, and whether a 403
# means the token itself is no longer valid).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

# Token lifecycle: a renewable token is renewed before a third of its TTL is left.
path "auth/token/renew-self" {
  capabilities = ["update"]
}

# Trust anchors: new roots are generated inside Vault (the key never leaves it),
# read back by name, and sign the Linkerd issuer and the Kong intermediate.
path "pki-root/root/rotate/internal" {
  capabilities = ["update"]
}
path "pki-root/issuer/+" {
  capabilities = ["read"]
}
path "pki-root/issuer/+/sign-intermediate" {
  capabilities = ["update"]
}

# A lost journal is rebuilt from the named issuers (root-N, kong-N) on both mounts.
path "pki-root/issuers" {
  capabilities = ["list"]
}
path "pki-kong/issuers" {
  capabilities = ["list"]
}

# Root rotation: at activation the new root and its Kong intermediate become the
# mounts' default issuers (for anyone else signing there; the daemon names its issuer).
# Reading the root mount's default tells a journal rebuilt after a loss which root was
# active.
path "pki-root/config/issuers" {
  capabilities = ["read", "update"]
}
path "pki-kong/config/issuers" {
  capabilities = ["update"]
}

# Kong intermediate: key generated inside Vault, imported once the root signed it,
# then named; Kong client CSRs are signed by the kong-client role only.
path "pki-kong/intermediate/generate/internal" {
  capabilities = ["update"]
}
path "pki-kong/intermediate/set-signed" {
  capabilities = ["update"]
}
path "pki-kong/issuer/+" {
  capabilities = ["read", "patch"]
}
path "pki-kong/issuer/+/sign/kong-client" {
  capabilities = ["update"]
}

# A Kong client whose key leaked (rotate kong/<name> --revoke): its replaced certificate
# is revoked (the role stores nothing, so Vault is handed the certificate), and the CRL
# of every CA in the bundle is read, and rebuilt before its next update.
path "pki-kong/revoke" {
  capabilities = ["update"]
}
path "pki-root/issuer/+/crl" {
  capabilities = ["read"]
}
path "pki-kong/issuer/+/crl" {
  capabilities = ["read"]
}
path "pki-root/crl/rotate" {
  capabilities = ["read"]
}
path "pki-kong/crl/rotate" {
  capabilities = ["read"]
}

# The rotation journal (KV v2, written with check-and-set): the CA record, and the
# issued credentials in 64 shard records below it (listed and read on every pass).
# Metadata is read to tell a check-and-set conflict.
path "secret/data/ca-daemon/state" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/ca-daemon/state" {
  capabilities = ["read"]
}
path "secret/data/ca-daemon/state/shards/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/ca-daemon/state/shards/*" {
  capabilities = ["read", "list"]
}
# An earlier release kept one record per credential here: read once, moved into the
# shards and removed on upgrade. Nothing is written here any more.
path "secret/data/ca-daemon/state/credentials/*" {
  capabilities = ["read"]
}
path "secret/metadata/ca-daemon/state/credentials/*" {
  capabilities = ["read", "list", "delete"]
}
