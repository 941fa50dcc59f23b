{{/* What the probe's controller reads: ConfigMaps, nothing else. */}}
{{- define "noop.rules" -}}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch"]
{{- end -}}
