{{/* The metrics Service, an optional ServiceMonitor, and a PodDisruptionBudget when replicas > 1. */}}
{{- define "gantry.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "gantry.fullname" . }}-metrics
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "gantry.selectorLabels" . | nindent 4 }}
  ports:
    - name: metrics
      port: {{ .Values.metrics.port }}
      targetPort: metrics
{{- end -}}

{{- define "gantry.serviceMonitor" -}}
{{- if .Values.metrics.serviceMonitor.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "gantry.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
    {{- with .Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "gantry.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ .Values.metrics.serviceMonitor.interval }}
{{- end }}
{{- end -}}

{{- define "gantry.podDisruptionBudget" -}}
{{- if gt (int .Values.replicas) 1 }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "gantry.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "gantry.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/*
The operator's CRDs, generated into files/crds.yaml by `make crds`. Shipped as templates (not
in crds/) so `helm upgrade` updates their schemas; annotated to survive `helm uninstall`, since
deleting a CRD deletes every object of its kind.
*/}}
{{- define "gantry.crds" -}}
{{- if .Values.crds.install }}
{{ .Files.Get "files/crds.yaml" }}
{{- end }}
{{- end -}}
