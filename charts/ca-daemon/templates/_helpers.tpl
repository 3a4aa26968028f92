{{- define "ca-daemon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ca-daemon.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ca-daemon.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ca-daemon.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ca-daemon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ca-daemon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ca-daemon.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ca-daemon.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ca-daemon.dataDir" -}}/var/lib/ca-daemon{{- end -}}
{{- define "ca-daemon.vaultTokenDir" -}}/var/run/secrets/vault{{- end -}}

{{/*
The configuration file the daemon reads: .Values.config with the keys the chart owns.
*/}}
{{- define "ca-daemon.config" -}}
{{- $c := deepCopy (.Values.config | default dict) -}}
{{- $publish := get $c "publish" | default dict -}}
{{- $_ := set $publish "kubernetes" (dict "enabled" true) -}}
{{- $_ := set $c "publish" $publish -}}
{{- $le := get $c "leader_election" | default dict -}}
{{- $_ := set $le "enabled" true -}}
{{- $_ := set $le "namespace" .Release.Namespace -}}
{{- $_ := set $c "leader_election" $le -}}
{{- $anchor := get $c "anchor" | default dict -}}
{{- $local := get $anchor "local" | default dict -}}
{{- $_ := set $local "dir" (printf "%s/data" (include "ca-daemon.dataDir" .)) -}}
{{- $_ := set $anchor "local" $local -}}
{{- $vault := get $anchor "vault" | default dict -}}
{{- $auth := get $vault "auth" | default dict -}}
{{- if eq (get $auth "method" | default "token") "kubernetes" -}}
{{- $_ := set $auth "jwt_file" (printf "%s/token" (include "ca-daemon.vaultTokenDir" .)) -}}
{{- $_ := set $vault "auth" $auth -}}
{{- $_ := set $anchor "vault" $vault -}}
{{- end -}}
{{- $_ := set $c "anchor" $anchor -}}
{{- toYaml $c -}}
{{- end -}}

{{- define "ca-daemon.port" -}}
{{- $server := .Values.config.server | default dict -}}
{{- get $server "address" | default "127.0.0.1:8080" | splitList ":" | last -}}
{{- end -}}

{{/*
The RBAC rules the configuration needs: the same rules, with the same inputs, as
ca_daemon/report/rbac.py (`ca-daemon config rbac`). tests/deploy/test_chart.py renders the
chart for several configurations and compares these with rbac.manifests(); keep them in step.
Output: JSON {"namespaces": {ns: [rules]}, "cluster": [rules]}.
*/}}
{{- define "ca-daemon.rbacRules" -}}
{{- $c := .Values.config | default dict -}}
{{- $l := get $c "linkerd" | default dict -}}
{{- $linkerdEnabled := true -}}
{{- if hasKey $l "enabled" -}}{{- $linkerdEnabled = $l.enabled -}}{{- end -}}
{{- $linkerdNs := get $l "namespace" | default "linkerd" -}}
{{- $restart := get $l "restart" | default "control-plane" -}}
{{- $gate := get $l "gate" | default "pods" -}}
{{- $emergencyRestart := get $l "emergency_restart" | default "as-restart" -}}
{{- $rollsAll := or (eq $restart "all") (eq $emergencyRestart "all") -}}
{{- $confirm := get $l "confirm" | default "events" -}}
{{- $issuerSecret := get $l "issuer_secret" | default "linkerd-identity-issuer" -}}
{{- $trustRoots := get $l "trust_roots_configmap" | default "linkerd-identity-trust-roots" -}}
{{- $k := get $c "kong" | default dict -}}
{{- $kongEnabled := true -}}
{{- if hasKey $k "enabled" -}}{{- $kongEnabled = $k.enabled -}}{{- end -}}
{{- $kongNs := get $k "namespace" | default "kong" -}}
{{- $delivery := get $k "delivery" | default "kubernetes" -}}
{{- $server := get $c "server" | default dict -}}
{{- $serverAuth := get $server "auth" | default "static" -}}
{{- $secrets := dict -}}
{{- $configmaps := dict -}}
{{- $services := dict -}}
{{- $verifying := dict -}}
{{- $kongCaNs := "" -}}
{{- if $linkerdEnabled -}}
{{- $_ := set $secrets $linkerdNs (append (get $secrets $linkerdNs | default list) (get $l "issuer_secret" | default "linkerd-identity-issuer")) -}}
{{- $_ := set $configmaps $linkerdNs (append (get $configmaps $linkerdNs | default list) $trustRoots) -}}
{{- end -}}
{{- if and $kongEnabled (eq $delivery "kubernetes") -}}
{{- $kongCaNs = $kongNs -}}
{{- range $client := (get $k "clients" | default list) -}}
{{- $ns := $kongNs -}}
{{- if $client.service -}}
{{- $parts := splitList "/" $client.service -}}
{{- $name := last $parts -}}
{{- if gt (len $parts) 1 -}}{{- $ns = first $parts -}}{{- end -}}
{{- $_ := set $services $ns (append (get $services $ns | default list) $name) -}}
{{- if $client.verify_upstream -}}{{- $_ := set $verifying $ns true -}}{{- end -}}
{{- end -}}
{{- $secret := $client.secret | default (printf "kong-upstream-%s" $client.name) -}}
{{- $_ := set $secrets $ns (append (get $secrets $ns | default list) $secret) -}}
{{- end -}}
{{- end -}}
{{- range $target := (get $c "bundles" | default list) -}}
{{- $_ := set $configmaps $target.namespace (append (get $configmaps $target.namespace | default list) $target.configmap) -}}
{{- end -}}
{{- /* A namespace with this many objects of one kind is read with one LIST (rbac.LIST_FROM). */ -}}
{{- $listFrom := 2 -}}
{{- $rules := dict -}}
{{- range $ns, $names := $secrets -}}
{{- $create := list "create" -}}
{{- if ge (len ($names | uniq)) $listFrom -}}{{- $create = append $create "list" -}}{{- end -}}
{{- $_ := set $rules $ns (concat (get $rules $ns | default list) (list
    (dict "apiGroups" (list "") "resources" (list "secrets") "verbs" (list "get" "update") "resourceNames" ($names | uniq | sortAlpha))
    (dict "apiGroups" (list "") "resources" (list "secrets") "verbs" $create))) -}}
{{- end -}}
{{- range $ns, $names := $configmaps -}}
{{- $create := list "create" -}}
{{- if ge (len ($names | uniq)) $listFrom -}}{{- $create = append $create "list" -}}{{- end -}}
{{- $_ := set $rules $ns (concat (get $rules $ns | default list) (list
    (dict "apiGroups" (list "") "resources" (list "configmaps") "verbs" (list "get" "update") "resourceNames" ($names | uniq | sortAlpha))
    (dict "apiGroups" (list "") "resources" (list "configmaps") "verbs" $create))) -}}
{{- end -}}
{{- range $ns, $names := $services -}}
{{- $_ := set $rules $ns (append (get $rules $ns | default list)
    (dict "apiGroups" (list "") "resources" (list "services") "verbs" (list "get" "patch") "resourceNames" ($names | uniq | sortAlpha))) -}}
{{- if ge (len ($names | uniq)) $listFrom -}}
{{- $_ := set $rules $ns (append (get $rules $ns) (dict "apiGroups" (list "") "resources" (list "services") "verbs" (list "list"))) -}}
{{- end -}}
{{- end -}}
{{- if $kongCaNs -}}
{{- $_ := set $rules $kongCaNs (concat (get $rules $kongCaNs | default list) (list
    (dict "apiGroups" (list "") "resources" (list "secrets") "verbs" (list "get" "list" "update" "delete"))
    (dict "apiGroups" (list "") "resources" (list "secrets") "verbs" (list "create")))) -}}
{{- end -}}
{{- /* CA reference ConfigMaps (verify_upstream) are named after root fingerprints. */ -}}
{{- range $ns, $_ := $verifying -}}
{{- $_ := set $rules $ns (concat (get $rules $ns | default list) (list
    (dict "apiGroups" (list "") "resources" (list "configmaps") "verbs" (list "get" "list" "update" "delete"))
    (dict "apiGroups" (list "") "resources" (list "configmaps") "verbs" (list "create")))) -}}
{{- end -}}
{{- if and $linkerdEnabled (or (ne $restart "none") $rollsAll) -}}
{{- $_ := set $rules $linkerdNs (append (get $rules $linkerdNs | default list)
    (dict "apiGroups" (list "apps") "resources" (list "deployments") "verbs" (list "list" "patch"))) -}}
{{- end -}}
{{- /* The pods gate, which an emergency root rotation uses whatever gate says. */ -}}
{{- if $linkerdEnabled -}}
{{- $_ := set $rules $linkerdNs (append (get $rules $linkerdNs | default list)
    (dict "apiGroups" (list "") "resources" (list "events") "verbs" (list "get" "patch") "resourceNames" (list (printf "%s.ca-daemon-pods-pending" $trustRoots)))) -}}
{{- end -}}
{{- if and $linkerdEnabled (eq $confirm "events") -}}
{{- $_ := set $rules $linkerdNs (concat (get $rules $linkerdNs | default list) (list
    (dict "apiGroups" (list "") "resources" (list "events") "verbs" (list "list"))
    (dict "apiGroups" (list "") "resources" (list "pods") "verbs" (list "list"))
    (dict "apiGroups" (list "") "resources" (list "events") "verbs" (list "get" "patch") "resourceNames" (list (printf "%s.ca-daemon-issuer-unconfirmed" $issuerSecret))))) -}}
{{- end -}}
{{- /* Leader election (the chart turns it on): the one Lease, in the release namespace. */ -}}
{{- $lease := get (get $c "leader_election" | default dict) "lease" | default "ca-daemon" -}}
{{- $daemonNs := .Release.Namespace -}}
{{- $_ := set $rules $daemonNs (concat (get $rules $daemonNs | default list) (list
    (dict "apiGroups" (list "coordination.k8s.io") "resources" (list "leases") "verbs" (list "get" "update") "resourceNames" (list $lease))
    (dict "apiGroups" (list "coordination.k8s.io") "resources" (list "leases") "verbs" (list "create")))) -}}
{{- range $ns, $r := $rules -}}
{{- $_ := set $rules $ns (append $r (dict "apiGroups" (list "") "resources" (list "events") "verbs" (list "create"))) -}}
{{- end -}}
{{- $cluster := list -}}
{{- if eq $serverAuth "kubernetes" -}}
{{- $cluster = append $cluster (dict "apiGroups" (list "authentication.k8s.io") "resources" (list "tokenreviews") "verbs" (list "create")) -}}
{{- $cluster = append $cluster (dict "apiGroups" (list "authorization.k8s.io") "resources" (list "subjectaccessreviews") "verbs" (list "create")) -}}
{{- end -}}
{{- if $linkerdEnabled -}}
{{- $cluster = append $cluster (dict "apiGroups" (list "") "resources" (list "pods") "verbs" (list "list")) -}}
{{- if $rollsAll -}}
{{- $cluster = append $cluster (dict "apiGroups" (list "apps") "resources" (list "replicasets") "verbs" (list "get")) -}}
{{- $cluster = append $cluster (dict "apiGroups" (list "apps") "resources" (list "deployments" "statefulsets" "daemonsets") "verbs" (list "get" "patch")) -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "namespaces" $rules "cluster" $cluster) -}}
{{- end -}}
