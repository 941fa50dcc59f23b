{{/*
The operator's workload: a Deployment, or with nodeAgent.enabled a DaemonSet whose pods each act
on their own node. Both run the same pod: restricted pod security by default (non-root,
read-only root filesystem, no capabilities, no privilege escalation, seccomp RuntimeDefault).
A node agent gets more only as its chart declares in Chart.yaml (annotation
gantry.dev/node-privileges: host paths, capabilities, root); values.schema.json, generated from
that declaration, refuses anything else, and `xtask charts` checks the rendered pods against it.

Each operator chart defines "<chart>.args": its own flags, as a YAML list (may be empty).
*/}}
{{- define "gantry.workload" -}}
{{- if include "gantry.nodeAgent" . }}
{{- include "gantry.daemonset" . }}
{{- else }}
{{- include "gantry.deployment" . }}
{{- end }}
{{- end -}}

{{- define "gantry.nodeAgent" -}}
{{- if dig "nodeAgent" "enabled" false .Values.AsMap -}}true{{- end -}}
{{- end -}}

{{- define "gantry.deployment" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "gantry.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
spec:
  replicas: {{ .Values.replicas }}
  selector:
    matchLabels:
      {{- include "gantry.selectorLabels" . | nindent 6 }}
  template:
    {{- include "gantry.podTemplate" . | nindent 4 }}
{{- end -}}

{{- define "gantry.daemonset" -}}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "gantry.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
spec:
  selector:
    matchLabels:
      {{- include "gantry.selectorLabels" . | nindent 6 }}
  updateStrategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: {{ dig "nodeAgent" "maxUnavailable" 1 .Values.AsMap }}
  template:
    {{- include "gantry.podTemplate" . | nindent 4 }}
{{- end -}}

{{- define "gantry.podTemplate" -}}
{{- $agent := include "gantry.nodeAgent" . -}}
{{- $webhook := include "gantry.webhookEnabled" . -}}
{{- $hostPaths := dig "nodeAgent" "hostPaths" list .Values.AsMap -}}
metadata:
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "gantry.serviceAccountName" . }}
  automountServiceAccountToken: true
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- $pod := deepCopy .Values.podSecurityContext }}
    {{- if and $agent (dig "nodeAgent" "runAsRoot" false .Values.AsMap) }}
    {{- $_ := set $pod "runAsNonRoot" false }}
    {{- $_ := set $pod "runAsUser" 0 }}
    {{- $_ := set $pod "runAsGroup" 0 }}
    {{- end }}
    {{- toYaml $pod | nindent 4 }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: operator
      image: {{ include "gantry.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - run
        - --metrics-addr=0.0.0.0:{{ .Values.metrics.port }}
        - --health-addr=0.0.0.0:{{ .Values.health.port }}
        - --log-format={{ .Values.logFormat }}
        - --log-level={{ .Values.logLevel }}
        - --reconcile-interval-ms={{ .Values.reconcileIntervalMs }}
        - --shutdown-timeout-seconds={{ sub (int .Values.terminationGracePeriodSeconds) 5 }}
        {{- if and (not $agent) (include "gantry.leaderElect" .) }}
        - --leader-elect
        - --lease-name={{ include "gantry.fullname" . }}
        - --lease-namespace={{ .Release.Namespace }}
        {{- end }}
        {{- with .Values.watchNamespace }}
        - --namespace={{ . }}
        {{- end }}
        {{- if $webhook }}
        {{- include "gantry.webhookArgs" . | nindent 8 }}
        {{- end }}
        {{- with include (printf "%s.args" .Chart.Name) . | fromYamlArray }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        {{- if $agent }}
        - name: GANTRY_NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
        - name: health
          containerPort: {{ .Values.health.port }}
        {{- if $webhook }}
        - name: webhook
          containerPort: {{ .Values.webhook.port }}
        {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: health
        periodSeconds: 10
        failureThreshold: 3
      readinessProbe:
        httpGet:
          path: /readyz
          port: health
        periodSeconds: 5
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- $container := deepCopy .Values.containerSecurityContext }}
        {{- with and $agent (dig "nodeAgent" "capabilities" list .Values.AsMap) }}
        {{- $_ := set $container "capabilities" (dict "drop" (list "ALL") "add" .) }}
        {{- end }}
        {{- toYaml $container | nindent 8 }}
      {{- if or (and $agent $hostPaths) (include "gantry.webhookFiles" .) }}
      volumeMounts:
        {{- if $agent }}
        {{- range $hostPaths }}
        - name: {{ .name }}
          mountPath: {{ .path }}
          readOnly: {{ .readOnly | default false }}
        {{- end }}
        {{- end }}
        {{- if include "gantry.webhookFiles" . }}
        - name: webhook-tls
          mountPath: /tls
          readOnly: true
        {{- end }}
      {{- end }}
  {{- if or (and $agent $hostPaths) (include "gantry.webhookFiles" .) }}
  volumes:
    {{- if $agent }}
    {{- range $hostPaths }}
    - name: {{ .name }}
      hostPath:
        path: {{ .path }}
        type: {{ .type | default "Directory" }}
    {{- end }}
    {{- end }}
    {{- if include "gantry.webhookFiles" . }}
    - name: webhook-tls
      secret:
        secretName: {{ include "gantry.webhookSecretName" . }}
    {{- end }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $agent }}
  tolerations:
    # A node agent runs on every node, tainted or not.
    - operator: Exists
  {{- else }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and (not $agent) (gt (int .Values.replicas) 1) }}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "gantry.selectorLabels" . | nindent 10 }}
  {{- end }}
{{- end -}}
