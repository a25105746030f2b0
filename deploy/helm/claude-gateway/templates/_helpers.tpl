{{/*
Names, labels and the rendered config.yaml. Every template takes its names and
labels from here, so a rename happens in one place.
*/}}

{{- define "claude-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name, at most 63 characters (a DNS label). */}}
{{- define "claude-gateway.fullname" -}}
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

{{- define "claude-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "claude-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "claude-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "claude-gateway.labels" -}}
helm.sh/chart: {{ include "claude-gateway.chart" . }}
{{ include "claude-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: claude-partner-gateway
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "claude-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "claude-gateway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "claude-gateway.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The container's name; KEDA's TriggerAuthentication reads its env by this name. */}}
{{- define "claude-gateway.containerName" -}}gateway{{- end -}}

{{- define "claude-gateway.configPath" -}}/etc/claude-gateway/config.yaml{{- end -}}

{{/* terminationGracePeriodSeconds: the drain timeout plus a margin, from one value. */}}
{{- define "claude-gateway.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.drainTimeoutSeconds .Values.shutdown.terminationMarginSeconds -}}
{{- end -}}

{{/* The replica count Redis-degraded mode divides the org limits by. */}}
{{- define "claude-gateway.expectedReplicas" -}}
{{- if gt (int .Values.redis.expectedReplicas) 0 -}}
{{- .Values.redis.expectedReplicas -}}
{{- else if .Values.autoscaling.enabled -}}
{{- .Values.autoscaling.maxReplicas -}}
{{- else -}}
{{- max 1 (int .Values.replicaCount) -}}
{{- end -}}
{{- end -}}

{{/* Where each existing Secret is mounted. */}}
{{- define "claude-gateway.secretDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .root.Values.secrets.mountPath) .name -}}
{{- end -}}

{{- define "claude-gateway.kafkaSaslEnabled" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol -}}true{{- end -}}
{{- end -}}

{{- define "claude-gateway.kafkaTlsEnabled" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") -}}true{{- end -}}
{{- end -}}

{{/*
config.yaml, built as a dict and rendered with toYaml, so it is valid YAML
whatever the values. Secrets appear only as {file: ...} references to the
mounted Secrets; the service resolves them at start and on reload.
*/}}
{{- define "claude-gateway.configYaml" -}}
{{- $v := .Values -}}
{{- $kafka := dict
      "bootstrap_servers" $v.kafka.bootstrapServers
      "group_id" $v.kafka.groupId
      "client_id" $v.kafka.clientId
      "request_topic_prefix" $v.kafka.topicPrefixes.requests
      "response_topic_prefix" $v.kafka.topicPrefixes.responses
      "deadletter_topic_prefix" $v.kafka.topicPrefixes.deadletter
      "security_protocol" $v.kafka.securityProtocol -}}
{{- if include "claude-gateway.kafkaSaslEnabled" . -}}
{{- $dir := include "claude-gateway.secretDir" (dict "root" . "name" "kafka-sasl") -}}
{{- $_ := set $kafka "sasl_mechanism" $v.kafka.sasl.mechanism -}}
{{- if eq $v.kafka.sasl.mechanism "OAUTHBEARER" -}}
{{- $_ := set $kafka "sasl_oauth_token" (dict "file" (printf "%s/%s" $dir $v.secrets.kafkaSasl.oauthTokenKey)) -}}
{{- else -}}
{{- $_ := set $kafka "sasl_username" $v.kafka.sasl.username -}}
{{- $_ := set $kafka "sasl_password" (dict "file" (printf "%s/%s" $dir $v.secrets.kafkaSasl.passwordKey)) -}}
{{- end -}}
{{- end -}}
{{- if include "claude-gateway.kafkaTlsEnabled" . -}}
{{- $_ := set $kafka "ssl_check_hostname" $v.kafka.tls.checkHostname -}}
{{- if $v.secrets.kafkaTls.existingSecret -}}
{{- $dir := include "claude-gateway.secretDir" (dict "root" . "name" "kafka-tls") -}}
{{- if $v.secrets.kafkaTls.caKey -}}
{{- $_ := set $kafka "ssl_cafile" (printf "%s/%s" $dir $v.secrets.kafkaTls.caKey) -}}
{{- end -}}
{{- if $v.secrets.kafkaTls.certKey -}}
{{- $_ := set $kafka "ssl_certfile" (printf "%s/%s" $dir $v.secrets.kafkaTls.certKey) -}}
{{- $_ := set $kafka "ssl_keyfile" (printf "%s/%s" $dir $v.secrets.kafkaTls.keyKey) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $kafka = merge $kafka (deepCopy $v.kafka.settings) -}}

{{- $runtime := deepCopy $v.config.runtime -}}
{{- $_ := set $runtime "drain_timeout_s" $v.shutdown.drainTimeoutSeconds -}}
{{- $_ := set $runtime "http_port" $v.service.port -}}

{{- $cfg := dict
      "kafka" $kafka
      "anthropic" (deepCopy $v.config.anthropic)
      "runtime" $runtime
      "limiter_backend" (ternary "redis" "local" $v.redis.enabled) -}}
{{- with $v.config.retry }}{{ $_ := set $cfg "retry" (deepCopy .) }}{{ end -}}
{{- with $v.config.org_limits }}{{ $_ := set $cfg "org_limits" (deepCopy .) }}{{ end -}}
{{- with $v.config.models }}{{ $_ := set $cfg "models" (deepCopy .) }}{{ end -}}
{{- with $v.config.batches }}{{ $_ := set $cfg "batches" (deepCopy .) }}{{ end -}}
{{- with $v.config.price_version }}{{ $_ := set $cfg "price_version" . }}{{ end -}}
{{- with $v.config.response_cache }}{{ $_ := set $cfg "response_cache" (deepCopy .) }}{{ end -}}

{{- if $v.redis.enabled -}}
{{- $redis := dict
      "url" $v.redis.url
      "key_prefix" $v.redis.keyPrefix
      "timeout_s" $v.redis.timeoutSeconds
      "max_connections" (int $v.redis.maxConnections)
      "pool_timeout_s" $v.redis.poolTimeoutSeconds
      "degraded_share" $v.redis.degradedShare
      "expected_replicas" (int (include "claude-gateway.expectedReplicas" .)) -}}
{{- if $v.secrets.redis.existingSecret -}}
{{- $dir := include "claude-gateway.secretDir" (dict "root" . "name" "redis") -}}
{{- $_ := set $redis "password" (dict "file" (printf "%s/%s" $dir $v.secrets.redis.passwordKey)) -}}
{{- end -}}
{{- $_ := set $cfg "redis" $redis -}}
{{- end -}}

{{- $anthropicDir := include "claude-gateway.secretDir" (dict "root" . "name" "anthropic") -}}
{{- $signingDir := include "claude-gateway.secretDir" (dict "root" . "name" "signing") -}}
{{- $partners := list -}}
{{- range $v.partners -}}
{{- $p := omit (deepCopy .) "api_key" "signing" -}}
{{- $keyName := .id -}}
{{- if and .api_key .api_key.secret_key -}}{{- $keyName = .api_key.secret_key -}}{{- end -}}
{{- $_ := set $p "api_key" (dict "file" (printf "%s/%s" $anthropicDir $keyName)) -}}
{{- if .signing -}}
{{- $signing := omit (deepCopy .signing) "key_ids" -}}
{{- $keys := dict -}}
{{- $pid := .id -}}
{{- range (.signing.key_ids | default list) -}}
{{- $_ := set $keys . (dict "file" (printf "%s/%s.%s" $signingDir $pid .)) -}}
{{- end -}}
{{- if $keys }}{{ $_ := set $signing "keys" $keys }}{{ end -}}
{{- $_ := set $p "signing" $signing -}}
{{- end -}}
{{- $partners = append $partners $p -}}
{{- end -}}
{{- $_ := set $cfg "partners" $partners -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* True when any partner lists signing key ids: the signing Secret must be mounted. */}}
{{- define "claude-gateway.signingUsed" -}}
{{- range .Values.partners -}}
{{- if and .signing .signing.key_ids -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pod's runAsUser / runAsGroup / fsGroup lines, one for each securityIds value that is not null. */}}
{{- define "claude-gateway.securityIds" -}}
{{- range $key := list "runAsUser" "runAsGroup" "fsGroup" -}}
{{- $id := index $.Values.securityIds $key -}}
{{- if not (kindIs "invalid" $id) }}
{{ $key }}: {{ int64 $id }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The names of the volumes the chart itself mounts; extraVolumes must use others. */}}
{{- define "claude-gateway.ownVolumes" -}}
config tmp anthropic-keys signing-keys kafka-sasl kafka-tls redis
{{- end -}}

{{/* Cross-field checks JSON Schema cannot express; each names the value to change. */}}
{{- define "claude-gateway.validate" -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail (printf "autoscaling.maxReplicas (%v) must be >= autoscaling.minReplicas (%v)" .Values.autoscaling.maxReplicas .Values.autoscaling.minReplicas) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (eq .Values.autoscaling.kind "kafka-lag") (eq .Values.kafka.sasl.mechanism "OAUTHBEARER") (not .Values.autoscaling.kafkaLag.authenticationRef) -}}
{{- fail "autoscaling.kafkaLag.authenticationRef is required with kafka.sasl.mechanism OAUTHBEARER: KEDA cannot use a static OAuth token, create a TriggerAuthentication for your identity provider and name it here" -}}
{{- end -}}
{{- if and (eq (toString .Values.rollingUpdate.maxSurge) "0") (eq (toString .Values.rollingUpdate.maxUnavailable) "0") -}}
{{- fail "rollingUpdate.maxSurge and rollingUpdate.maxUnavailable cannot both be 0: a rollout could never start" -}}
{{- end -}}
{{- $group := .Values.securityIds.runAsGroup -}}
{{- if and (not (kindIs "invalid" $group)) (ne (int64 $group) 0) (kindIs "invalid" .Values.securityIds.fsGroup) -}}
{{- fail (printf "securityIds.fsGroup is required with securityIds.runAsGroup %v: the Secrets are mounted with mode 0440, readable by their group only (set fsGroup, e.g. to the same id, or leave runAsGroup null)" $group) -}}
{{- end -}}
{{- $volumes := dict -}}
{{- range (splitList " " (include "claude-gateway.ownVolumes" .)) -}}
{{- $_ := set $volumes . true -}}
{{- end -}}
{{- range .Values.extraVolumes -}}
{{- if hasKey $volumes .name -}}
{{- fail (printf "extraVolumes: the volume name %q is taken (by the chart or an earlier extra volume); the chart uses %s" .name (include "claude-gateway.ownVolumes" $)) -}}
{{- end -}}
{{- $_ := set $volumes .name true -}}
{{- end -}}
{{- $reserved := list "/tmp" "/etc/claude-gateway" (trimSuffix "/" .Values.secrets.mountPath) -}}
{{- range .Values.extraVolumeMounts -}}
{{- if not (hasKey $volumes .name) -}}
{{- fail (printf "extraVolumeMounts: %s names no volume; add a volume %q to extraVolumes" .mountPath .name) -}}
{{- end -}}
{{- $path := trimSuffix "/" .mountPath -}}
{{- range $reserved -}}
{{- if or (eq $path .) (hasPrefix (printf "%s/" .) $path) (hasPrefix (printf "%s/" $path) .) -}}
{{- fail (printf "extraVolumeMounts: %s overlaps %s, which the chart mounts itself" $path .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $ids := dict -}}
{{- range .Values.partners -}}
{{- if hasKey $ids .id -}}
{{- fail (printf "partners: duplicate partner id %q" .id) -}}
{{- end -}}
{{- $_ := set $ids .id true -}}
{{- end -}}
{{- end -}}
