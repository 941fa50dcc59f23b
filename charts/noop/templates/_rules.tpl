{{/* What the probe reads and writes: ConfigMaps (read), its own Probes and their status, and
the pods of its node when it runs as a node agent. */}}
{{- define "noop.rules" -}}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kit.gantry.dev"]
  resources: ["probes"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kit.gantry.dev"]
  resources: ["probes/status"]
  verbs: ["get", "patch"]
{{- if include "gantry.nodeAgent" . }}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- end -}}

{{- define "noop.args" -}}
- --probe-selector={{ .Values.probes.selector }}
{{- if .Values.probes.enabled }}
- --probes
{{- end }}
{{- end -}}

{{/* The probe's one webhook: it denies ConfigMaps labelled gantry.dev/deny=true. */}}
{{- define "noop.webhooks" -}}
- name: configmaps.noop.gantry.dev
  path: /validate
  rules:
    - apiGroups: [""]
      apiVersions: ["v1"]
      operations: ["CREATE", "UPDATE"]
      resources: ["configmaps"]
{{- end -}}
