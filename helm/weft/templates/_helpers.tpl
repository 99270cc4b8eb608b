{{/* Names are fixed: agents reach the controller as weft-controller.<ns>.svc. */}}
{{- define "weft.controllerName" -}}weft-controller{{- end -}}
{{- define "weft.agentName" -}}weft-agent{{- end -}}
{{- define "weft.caSecret" -}}weft-ca{{- end -}}
{{- define "weft.caConfigMap" -}}weft-ca-root{{- end -}}
{{- define "weft.controllerHost" -}}weft-controller.{{ .Release.Namespace }}.svc{{- end -}}

{{- define "weft.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "weft.labels" -}}
app.kubernetes.io/part-of: weft
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "weft.leaderElect" -}}
{{- if or .Values.controller.leaderElection.enabled (gt (int .Values.controller.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{/* The plural of every weft.dev CRD shipped in crds/: RBAC follows the generated CRDs. */}}
{{- define "weft.crdPlurals" -}}
{{- range $path, $_ := .Files.Glob "crds/*.yaml" }}
{{- $crd := $.Files.Get $path | fromYaml }}
- {{ $crd.spec.names.plural }}
{{- end }}
{{- end -}}

{{- define "weft.quotaRedisName" -}}weft-quota-redis{{- end -}}

{{/* The waypoints' WEFT_QUOTA_STORE: an existing Secret's URL, a given URL, the Redis this
chart deploys, or memory (each replica on its own). */}}
{{- define "weft.quotaStoreEnv" -}}
{{- $q := .Values.quotaStore -}}
- name: WEFT_QUOTA_STORE
{{- if $q.existingSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ $q.existingSecret.name }}
      key: {{ $q.existingSecret.key }}
{{- else if $q.url }}
  value: {{ $q.url | quote }}
{{- else if $q.redis.enabled }}
  valueFrom:
    secretKeyRef:
      name: {{ include "weft.quotaRedisName" . }}-url
      key: url
{{- else }}
  value: memory
{{- end }}
{{- end -}}

{{/* The chart's quota Redis password: the existing Secret's (kept across upgrades), else
one generated for this release, the same in every template of one render. */}}
{{- define "weft.quotaRedisPassword" -}}
{{- $r := .Values.quotaStore.redis -}}
{{- if not (hasKey $r "_password") -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "weft.quotaRedisName" .) -}}
{{- if and $old $old.data (hasKey $old.data "password") -}}
{{- $_ := set $r "_password" (index $old.data "password" | b64dec) -}}
{{- else -}}
{{- $_ := set $r "_password" (randAlphaNum 32) -}}
{{- end -}}
{{- end -}}
{{- index $r "_password" -}}
{{- end -}}

{{/* The URL of the chart's quota Redis, password included. */}}
{{- define "weft.quotaRedisURL" -}}
{{- printf "redis://:%s@%s.%s.svc:6379/0" (include "weft.quotaRedisPassword" .) (include "weft.quotaRedisName" .) .Release.Namespace -}}
{{- end -}}

{{/*
"true" when waypoints get a Gateway API Gateway (class weft-waypoint) and the chart its
GatewayClass: gatewayAPI.waypointGateways true, or auto and the cluster serves the
Gateway API (helm template: --api-versions gateway.networking.k8s.io/v1/Gateway).
*/}}
{{- define "weft.waypointGateways" -}}
{{- $mode := toString .Values.gatewayAPI.waypointGateways -}}
{{- if eq $mode "true" -}}true
{{- else if and (eq $mode "auto") (.Capabilities.APIVersions.Has "gateway.networking.k8s.io/v1/Gateway") -}}true
{{- else -}}false
{{- end -}}
{{- end }}

{{/*
The socket keeper (agent/keeper.py) as a native sidecar: it holds the pod's listening
sockets across a crash or an in-place restart of the main container. No capabilities: it
only keeps descriptors. Mounts the pod's "keeper" emptyDir at /run/weft-keeper.
Call with (dict "root" $ "resources" RESOURCES).
*/}}
{{- define "weft.socketKeeper" -}}
- name: socket-keeper
  image: {{ include "weft.image" .root | quote }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  restartPolicy: Always
  command: ["weft", "agent", "keeper"]
  args:
    - --socket=/run/weft-keeper/keeper.sock
  env:
    - name: WEFT_LOG_LEVEL
      value: {{ .root.Values.logLevel | quote }}
  securityContext:
    privileged: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    - name: keeper
      mountPath: /run/weft-keeper
{{- end }}
