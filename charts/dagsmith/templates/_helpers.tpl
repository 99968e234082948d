{{/* Names and labels. */}}
{{- define "dagsmith.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>" within a length limit, the fullname shortened (never the suffix) to fit:
Service names, and the names KEDA or the Job controller copy into label values, must be at most 63
characters; a StatefulSet's at most 52 (its pods' controller-revision-hash label adds 11).
(dict "ctx" $ "suffix" "controller-metrics") or (dict "ctx" $ "suffix" "postgres" "max" 52) */}}
{{- define "dagsmith.name" -}}
{{- $room := sub (.max | default 63) (add1 (len .suffix)) | int -}}
{{- if lt $room 1 -}}
{{- fail (printf "the name suffix %q leaves no room for the release name" .suffix) -}}
{{- end -}}
{{- printf "%s-%s" (include "dagsmith.fullname" .ctx | trunc $room | trimSuffix "-") .suffix -}}
{{- end -}}

{{- define "dagsmith.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dagsmith.labels" -}}
{{ include "dagsmith.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dagsmith
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels of one component: (dict "ctx" $ "component" "api") */}}
{{- define "dagsmith.componentLabels" -}}
{{ include "dagsmith.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dagsmith.componentSelector" -}}
{{ include "dagsmith.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dagsmith.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end -}}

{{/* Where the connection URLs live: an existing Secret, or the one this chart writes. */}}
{{- define "dagsmith.databaseSecret" -}}
{{ .Values.database.existingSecret | default (printf "%s-connections" (include "dagsmith.fullname" .)) }}
{{- end -}}
{{- define "dagsmith.rabbitmqSecret" -}}
{{ .Values.rabbitmq.existingSecret | default (printf "%s-connections" (include "dagsmith.fullname" .)) }}
{{- end -}}

{{/* Environment of a Dagsmith container: the settings and the broker for every one; Postgres and
the admin token only where asked for, since executors and the evaluator talk to RabbitMQ alone and
only the API reads the token. (dict "ctx" $ "database" true "adminToken" true) */}}
{{- define "dagsmith.env" -}}
{{- $ctx := .ctx -}}
envFrom:
  - configMapRef:
      name: {{ include "dagsmith.fullname" $ctx }}-settings
env:
  {{- if .database }}
  - name: DAGSMITH_DATABASE_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "dagsmith.databaseSecret" $ctx }}
        key: {{ $ctx.Values.database.secretKey }}
  {{- end }}
  - name: DAGSMITH_AMQP_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "dagsmith.rabbitmqSecret" $ctx }}
        key: {{ $ctx.Values.rabbitmq.secretKey }}
  {{- if .adminToken }}
  - name: DAGSMITH_ADMIN_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "dagsmith.adminTokenSecret" $ctx }}
        key: {{ $ctx.Values.auth.adminTokenKey }}
  {{- end }}
{{- end -}}

{{/* Container fields shared by every Dagsmith container. */}}
{{- define "dagsmith.container" -}}
image: {{ include "dagsmith.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- end -}}

{{/* Pod fields shared by every Dagsmith pod. */}}
{{- define "dagsmith.pod" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: tmp
    emptyDir: {}
{{- end -}}

{{/* The HTTP probe of a metrics port. */}}
{{- define "dagsmith.metricsProbes" -}}
livenessProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 10
  timeoutSeconds: 5
{{- end -}}

{{/* The Secret holding the bootstrap admin token: the user's, or the one the chart makes. */}}
{{- define "dagsmith.adminTokenSecret" -}}
{{ .Values.auth.existingSecret | default (printf "%s-admin-token" (include "dagsmith.fullname" .)) }}
{{- end -}}

{{/* kopf's peering object. A ClusterKopfPeering is cluster-wide, so the default carries the
release's name and namespace, as the ClusterRole's name does: two releases never share one. */}}
{{- define "dagsmith.peeringName" -}}
{{ .Values.operator.peeringName | default (printf "%s-%s" (include "dagsmith.fullname" .) .Release.Namespace | trimSuffix "-") }}
{{- end -}}
